"""group.json: group control messages as one member sees them, welcomes, forged changes.

The test group's parameters are the users (user identity and device seeds)
and the directory of their signed device lists. A test is one observer's
transcript of steps:

* ``genesis``: the observer starts the group from a ``create`` message;
* ``apply``: the observer applies a control message (with the directory,
  or with ``directory`` overriding some users' lists for that step);
* ``join``: a new member (``user_id``, ``user_identity``) joins from a
  welcome, replacing the observer's view.

Every control message made honestly comes with ``built_by`` (author,
device and action), from which the exact bytes can be rebuilt and signed.
Valid steps give the observer's ``state`` after (the current snapshot, its
hash and the hashes of all held states) and the ``events``; invalid ones the
``error``, the view unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from hushchat.protocol.consts import MAX_GROUP_HISTORY
from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.group import (
    GENESIS_PARENT_HASH,
    Action,
    AddMember,
    AdminChanged,
    ControlMessage,
    CreateGroup,
    Group,
    GroupEvent,
    GroupState,
    GroupUpdate,
    Leave,
    MemberAdded,
    MemberRemoved,
    RemoveMember,
    Replaces,
    SetAdmin,
    SetTitle,
    TitleChanged,
    Welcome,
)
from hushchat.protocol.keys import IdentityKeyPair

from ._common import Checker, Json, case, h, note, seeded, unhex, vector_file

NAME = "group"
USERS = ("alice", "bob", "carol", "dave", "mallory")

NOTES = {
    "Lifecycle": note("BASIC", "Create, add, promote, retitle, remove, leave."),
    "ForgedChange": note(
        "AUTH_BYPASS",
        "A validly signed change by a member who is not an admin (a ghost member added).",
    ),
    "NonMember": note("AUTH_BYPASS", "A change signed by someone outside the group."),
    "WrongDevice": note(
        "AUTH_BYPASS",
        "Signed with a key that is not the listed identity of the author device, or by a "
        "device the author's list does not name.",
    ),
    "BadSignature": note("AUTH_BYPASS", "The signature does not verify."),
    "IdentityMismatch": note(
        "AUTH_BYPASS",
        "The author's device list is signed by another user identity than the group records.",
    ),
    "Stale": note("BASIC", "The change builds on a state the observer does not hold."),
    "Duplicate": note("REPLAY", "A change applied twice."),
    "Concurrent": note(
        "BASIC",
        "Two concurrent changes on one parent: the first applied wins and the other is stale, "
        "whatever their change ids (no member switches branches).",
    ),
    "RewindOldParent": note(
        "AUTH_BYPASS",
        "A change on an ancestor of the current state, which version 1's fork rule let replace "
        "the changes after it (a member who is no admin undoing a removal).",
    ),
    "RemovedAuthor": note(
        "AUTH_BYPASS",
        "A change signed by a member already removed: on the current state or on one from "
        "before its removal.",
    ),
    "GroundChangeId": note(
        "AUTH_BYPASS",
        "A change whose author ground author_device_id (a device list listing the device found) "
        "for a change id below the change that followed its parent: still stale.",
    ),
    "InvalidAction": note("BASIC", "An action the parent state does not allow."),
    "OtherGroup": note("BASIC", "A change for another group."),
    "Welcome": note("BASIC", "A new member joins from a welcome."),
    "Reinit": note(
        "BASIC",
        "A create that continues another group (replaces: its id, epoch and state hash), the "
        "way back to one state after a split; it may not name its own group.",
    ),
    "ForgedWelcome": note(
        "AUTH_BYPASS", "A welcome whose history or addressee does not match its signed change."
    ),
}


# ------------------------------------------------------------------ users and directory


def _user_key(user: str) -> IdentityKeyPair:
    return IdentityKeyPair(seeded(f"group/{user}/user").random_bytes(32))


def _device_key(user: str, device_id: int = 1) -> IdentityKeyPair:
    return IdentityKeyPair(seeded(f"group/{user}/device {device_id}").random_bytes(32))


def _signed_list(
    user: str, identity: IdentityKeyPair | None = None, devices: tuple[int, ...] = (1,)
) -> SignedDeviceList:
    key = identity or _user_key(user)
    entries = [
        DeviceEntry.prove(_device_key(user, d), user, d, key.public.ed25519) for d in devices
    ]
    return DeviceList.initial(user, key.public.ed25519, entries).sign(key)


def _users_json(extra_devices: Mapping[str, tuple[int, ...]]) -> Json:
    return {
        user: {
            "user_identity_seed": h(_user_key(user).seed),
            "user_identity": h(_user_key(user).public.ed25519),
            "devices": {
                str(d): h(_device_key(user, d).seed) for d in (1, *extra_devices.get(user, ()))
            },
        }
        for user in USERS
    }


DIRECTORY = {user: _signed_list(user) for user in USERS}


def _identity(user: str) -> bytes:
    return _user_key(user).public.ed25519


# ------------------------------------------------------------------ JSON forms


def action_json(action: Action) -> Json:
    if isinstance(action, CreateGroup):
        return {
            "action": "create",
            "title": action.title,
            "members": [[m.user_id, h(m.user_identity)] for m in action.members],
            "replaces": None
            if action.replaces is None
            else {
                "group_id": h(action.replaces.group_id),
                "epoch": action.replaces.epoch,
                "state_hash": h(action.replaces.state_hash),
            },
        }
    if isinstance(action, AddMember):
        return {
            "action": "add_member",
            "user_id": action.user_id,
            "user_identity": h(action.user_identity),
        }
    if isinstance(action, RemoveMember):
        return {"action": "remove_member", "user_id": action.user_id}
    if isinstance(action, Leave):
        return {"action": "leave"}
    if isinstance(action, SetAdmin):
        return {"action": "set_admin", "user_id": action.user_id, "admin": action.admin}
    return {"action": "set_title", "title": action.title}


def action_from_json(d: Json) -> Action:
    kind = d["action"]
    if kind == "create":
        members = tuple(AddMember(u, unhex(i)) for u, i in d["members"])
        old = d["replaces"]
        replaces = (
            None
            if old is None
            else Replaces(unhex(old["group_id"]), old["epoch"], unhex(old["state_hash"]))
        )
        return CreateGroup(d["title"], members, replaces)
    if kind == "add_member":
        return AddMember(d["user_id"], unhex(d["user_identity"]))
    if kind == "remove_member":
        return RemoveMember(d["user_id"])
    if kind == "leave":
        return Leave()
    if kind == "set_admin":
        return SetAdmin(d["user_id"], d["admin"])
    return SetTitle(d["title"])


def _event_json(event: GroupEvent) -> Json:
    if isinstance(event, MemberAdded):
        return {
            "event": "member_added",
            "user_id": event.user_id,
            "user_identity": h(event.user_identity),
            "admin": event.admin,
        }
    if isinstance(event, MemberRemoved):
        return {"event": "member_removed", "user_id": event.user_id}
    if isinstance(event, AdminChanged):
        return {"event": "admin_changed", "user_id": event.user_id, "admin": event.admin}
    assert isinstance(event, TitleChanged)
    return {"event": "title_changed", "title": event.title}


def view_json(group: Group) -> Json:
    return {
        "snapshot": h(group.current.encode()),
        "state_hash": h(group.current.state_hash),
        "held": [h(s.state_hash) for s in group.states],
    }


def _update_json(update: GroupUpdate) -> Json:
    return {"state": view_json(update.group), "events": [_event_json(e) for e in update.events]}


# ------------------------------------------------------------------ transcripts


def _sign(
    author: str,
    action: Action,
    *,
    group_id: bytes,
    parent_epoch: int,
    parent_hash: bytes,
    device_id: int = 1,
) -> ControlMessage:
    return ControlMessage.sign(
        _device_key(author, device_id),
        group_id=group_id,
        parent_epoch=parent_epoch,
        parent_hash=parent_hash,
        author_user_id=author,
        author_device_id=device_id,
        action=action,
    )


def _built_by(message: ControlMessage) -> Json:
    return {
        "group_id": h(message.group_id),
        "parent_epoch": message.parent_epoch,
        "parent_hash": h(message.parent_hash),
        "author_user_id": message.author_user_id,
        "author_device_id": message.author_device_id,
        **action_json(message.action),
    }


class _Transcript:
    def __init__(self, label: str) -> None:
        self.group_id = seeded("group/" + label).random_bytes(16)
        self.view: Group | None = None
        self.steps: list[Json] = []

    def create(
        self,
        title: str,
        members: tuple[str, ...],
        author: str = "alice",
        replaces: Replaces | None = None,
    ) -> ControlMessage:
        adds = tuple(AddMember(u, _identity(u)) for u in sorted(members))
        action = CreateGroup(title, adds, replaces)
        return _sign(
            author, action, group_id=self.group_id, parent_epoch=0, parent_hash=GENESIS_PARENT_HASH
        )

    def propose(self, author: str, action: Action) -> ControlMessage:
        assert self.view is not None
        return self.propose_on(self.view.current, author, action)

    def propose_on(
        self, parent: GroupState, author: str, action: Action, device_id: int = 1
    ) -> ControlMessage:
        return _sign(
            author,
            action,
            group_id=parent.group_id,
            parent_epoch=parent.epoch,
            parent_hash=parent.state_hash,
            device_id=device_id,
        )

    def _record(self, step: Json, run: Any) -> None:
        try:
            update: GroupUpdate = run()
        except Exception as exc:  # the reference's verdict is what gets recorded
            step.update(result="invalid", error=getattr(exc, "code", type(exc).__name__))
        else:
            self.view = update.group
            step.update(result="valid", **_update_json(update))
        if step["result"] == "invalid":
            step["state"] = None if self.view is None else view_json(self.view)
        self.steps.append(step)

    def genesis(self, message: ControlMessage) -> None:
        step = {"op": "genesis", **_message_json(message, honest=True)}
        self._record(step, lambda: Group.from_genesis(message, DIRECTORY))

    def apply(
        self,
        message: ControlMessage | bytes,
        *,
        honest: bool = True,
        directory: dict[str, SignedDeviceList] | None = None,
        comment: str | None = None,
    ) -> None:
        step: Json = {"op": "apply", **_message_json(message, honest=honest)}
        if comment is not None:
            step["modification"] = comment
        lists = dict(DIRECTORY)
        if directory is not None:
            step["directory"] = {u: h(s.encode()) for u, s in directory.items()}
            lists.update(directory)
        view = self.view
        assert view is not None

        def run() -> GroupUpdate:
            data = message if isinstance(message, bytes) else message.encode()
            return view.apply(ControlMessage.decode(data), lists)

        self._record(step, run)

    def join(self, welcome: bytes, user: str, *, comment: str | None = None) -> None:
        step: Json = {
            "op": "join",
            "welcome": h(welcome),
            "user_id": user,
            "user_identity": h(_identity(user)),
        }
        if comment is not None:
            step["modification"] = comment

        def run() -> GroupUpdate:
            return Group.join(
                Welcome.decode(welcome), DIRECTORY, user_id=user, user_identity=_identity(user)
            )

        self._record(step, run)

    def case(self, comment: str, flags: tuple[str, ...]) -> Json:
        errors = [s["error"] for s in self.steps if s.get("result") == "invalid"]
        return case(
            comment,
            result="invalid" if errors else "valid",
            error=errors[0] if errors else None,
            flags=flags,
            steps=self.steps,
        )


def _message_json(message: ControlMessage | bytes, *, honest: bool) -> Json:
    data = message if isinstance(message, bytes) else message.encode()
    out: Json = {"message": h(data)}
    if honest and isinstance(message, ControlMessage):
        out["built_by"] = _built_by(message)
        out["change_id"] = h(message.change_id)
    return out


def _started(label: str, members: tuple[str, ...] = ("bob", "carol")) -> _Transcript:
    t = _Transcript(label)
    t.genesis(t.create("friends", members))
    return t


# Device ids an author tries for a small change id (grinding, GroundChangeId).
GRINDING_TRIES = 4096


def _grind(parent: GroupState, author: str, action: Action, target: bytes) -> int:
    """The device id (of GRINDING_TRIES, from 2) giving the smallest change id; below target."""
    ids = {
        ControlMessage(
            parent.group_id, parent.epoch, parent.state_hash, author, d, action, bytes(64)
        ).change_id: d
        for d in range(2, 2 + GRINDING_TRIES)
    }
    best = min(ids)
    assert best < target, "no smaller change id among the device ids tried"
    return ids[best]


def _tests(extra_devices: dict[str, tuple[int, ...]]) -> list[Json]:
    """The transcripts; ``extra_devices`` gets the devices the ground tests list."""
    tests = []
    t = _started("lifecycle")
    t.apply(t.propose("alice", AddMember("dave", _identity("dave"))))
    t.apply(t.propose("alice", SetAdmin("bob", True)))
    t.apply(t.propose("bob", SetTitle("best friends")))
    t.apply(t.propose("bob", RemoveMember("carol")))
    t.apply(t.propose("alice", Leave()))
    tests.append(t.case("create, add, promote, retitle, remove, leave", ("Lifecycle",)))

    t = _started("forged-add")
    t.apply(t.propose("bob", AddMember("mallory", _identity("mallory"))))
    t.apply(t.propose("alice", AddMember("dave", _identity("dave"))))
    tests.append(t.case("bob, not an admin, adds mallory; then a real add", ("ForgedChange",)))

    t = _started("non-member")
    t.apply(t.propose("mallory", AddMember("mallory", _identity("mallory"))))
    tests.append(t.case("mallory, not a member, adds herself", ("NonMember",)))

    t = _started("wrong-device-key")
    genuine = t.propose("alice", AddMember("mallory", _identity("mallory")))
    forged = ControlMessage.sign(
        _device_key("mallory"),
        group_id=genuine.group_id,
        parent_epoch=genuine.parent_epoch,
        parent_hash=genuine.parent_hash,
        author_user_id="alice",
        author_device_id=1,
        action=genuine.action,
    )
    t.apply(forged, honest=False, comment="signed by mallory's device key as alice's device 1")
    unlisted = ControlMessage.sign(
        _device_key("alice", 2),
        group_id=genuine.group_id,
        parent_epoch=genuine.parent_epoch,
        parent_hash=genuine.parent_hash,
        author_user_id="alice",
        author_device_id=2,
        action=genuine.action,
    )
    t.apply(unlisted, honest=False, comment="signed by alice's device 2, which her list lacks")
    tests.append(t.case("an admin's change signed by the wrong device", ("WrongDevice",)))

    t = _started("bad-signature")
    good = t.propose("alice", SetTitle("renamed"))
    body, signature = unpack(good.encode(), what="test")
    flipped = pack([body, signature[:-1] + bytes([signature[-1] ^ 1])])
    t.apply(flipped, honest=False, comment="last signature byte flipped")
    t.apply(good)
    tests.append(t.case("a change with a bad signature; then the real one", ("BadSignature",)))

    t = _started("identity-mismatch")
    impostor_identity = IdentityKeyPair(seeded("group/alice/new user").random_bytes(32))
    t.apply(
        t.propose("alice", SetTitle("mine now")),
        directory={"alice": _signed_list("alice", impostor_identity)},
        comment="alice's device list is signed by a new user identity",
    )
    tests.append(t.case("the author's list names another user identity", ("IdentityMismatch",)))

    t = _started("stale")
    ahead = t.propose("alice", SetTitle("one"))
    assert t.view is not None
    future = _sign(
        "alice",
        SetTitle("two"),
        group_id=t.group_id,
        parent_epoch=ahead.parent_epoch + 1,
        parent_hash=bytes(32),
    )
    t.apply(future, comment="parent epoch 1, not held yet")
    unknown = _sign(
        "alice",
        SetTitle("two"),
        group_id=t.group_id,
        parent_epoch=0,
        parent_hash=bytes([1]) * 32,
    )
    t.apply(unknown, comment="parent hash of no held state")
    t.apply(ahead)
    tests.append(t.case("changes on states not held; then a real one", ("Stale",)))

    t = _started("duplicate")
    change = t.propose("alice", SetTitle("again"))
    t.apply(change)
    t.apply(change)
    tests.append(t.case("the same change twice", ("Duplicate",)))

    for label, smaller_first in (("concurrent", False), ("concurrent, other order", True)):
        t = _started(label, ("bob", "carol"))
        t.apply(t.propose("alice", SetAdmin("bob", True)))
        first = t.propose("alice", SetTitle("alice's title"))
        second = t.propose("bob", SetTitle("bob's title"))
        larger, smaller = sorted((first, second), key=lambda m: m.change_id, reverse=True)
        winner, loser = (smaller, larger) if smaller_first else (larger, smaller)
        t.apply(winner)
        t.apply(loser)
        order = "smaller" if smaller_first else "larger"
        tests.append(
            t.case(
                f"two admins change the title at once; the {order} change id comes first and "
                "wins: the other is stale",
                ("Concurrent", "Stale"),
            )
        )

    t = _started("rewind by a member who is no admin")
    assert t.view is not None
    before_removal = t.view.current
    t.apply(t.propose("alice", RemoveMember("carol")))
    t.apply(t.propose_on(before_removal, "bob", Leave()), comment="bob's leave on epoch 0")
    tests.append(
        t.case(
            "alice removes carol; bob, no admin, leaves on the state before the removal",
            ("RewindOldParent",),
        )
    )

    t = _started("rewind by a removed member", ("bob", "carol", "dave"))
    assert t.view is not None
    before_removal = t.view.current
    t.apply(t.propose("alice", RemoveMember("carol")))
    t.apply(t.propose("alice", RemoveMember("dave")))
    t.apply(t.propose("carol", Leave()), comment="carol, removed, leaves the current state")
    t.apply(t.propose_on(before_removal, "carol", Leave()), comment="carol leaves on epoch 0")
    tests.append(
        t.case(
            "alice removes carol, then dave; carol leaves, now and on the state before her removal",
            ("RemovedAuthor", "RewindOldParent"),
        )
    )

    for label, author, admins, action in (
        ("ground by a member who is no admin", "bob", (), Leave()),
        ("ground by another admin", "bob", ("bob",), SetTitle("bob's")),
    ):
        t = _started(label)
        for admin in admins:
            t.apply(t.propose("alice", SetAdmin(admin, True)))
        assert t.view is not None
        before_removal = t.view.current
        removal = t.propose("alice", RemoveMember("carol"))
        t.apply(removal)
        device_id = _grind(before_removal, author, action, removal.change_id)
        extra_devices[author] = (*extra_devices.get(author, ()), device_id)
        t.apply(
            t.propose_on(before_removal, author, action, device_id),
            directory={author: _signed_list(author, devices=(1, device_id))},
            comment=f"{author}'s device {device_id} (listed for this step) gives a smaller "
            "change id than the removal's",
        )
        tests.append(
            t.case(
                f"alice removes carol; {author} ({'an admin' if admins else 'no admin'}) grinds "
                f"a change on the state before the removal ({GRINDING_TRIES} device ids tried)",
                ("GroundChangeId", "RewindOldParent"),
            )
        )

    t = _started("invalid-actions")
    t.apply(t.propose("alice", RemoveMember("alice")))
    t.apply(t.propose("alice", AddMember("bob", _identity("bob"))))
    t.apply(t.propose("alice", Leave()))
    t.apply(t.propose("alice", SetAdmin("alice", False)))
    t.apply(t.propose("alice", SetTitle("friends")))
    t.apply(t.create("again", ("bob", "carol")), comment="create again")
    t.apply(t.propose("alice", RemoveMember("carol")))
    tests.append(
        t.case(
            "remove oneself, add a member, last admin leaves or steps down, same title, "
            "create again; then a valid removal",
            ("InvalidAction",),
        )
    )

    old = _started("reinit/old", ("bob", "carol"))
    assert old.view is not None
    t = _Transcript("reinit")
    t.genesis(
        t.create(
            "friends",
            ("bob", "carol"),
            replaces=Replaces(old.group_id, old.view.epoch, old.view.state_hash),
        )
    )
    self_reinit = _Transcript("reinit/self")
    self_reinit.genesis(
        self_reinit.create(
            "friends", ("bob",), replaces=Replaces(self_reinit.group_id, 0, bytes(32))
        )
    )
    tests.append(t.case("alice continues a group in a new one (a reinit)", ("Reinit",)))
    tests.append(self_reinit.case("a reinit that names its own group", ("Reinit",)))

    t = _started("other-group")
    other = _Transcript("other-group/other")
    other_create = other.create("elsewhere", ("bob",))
    t.apply(other_create)
    tests.append(t.case("a create for another group", ("OtherGroup",)))
    return tests


def _welcome_tests() -> list[Json]:
    tests = []
    t = _Transcript("welcome-create")
    create = t.create("friends", ("bob", "carol"))
    t.join(Welcome(create, ()).encode(), "bob")
    tests.append(t.case("bob joins from the create", ("Welcome",)))

    t = _started("welcome-add")
    add = t.propose("alice", AddMember("dave", _identity("dave")))
    assert t.view is not None
    before = t.view
    t.apply(add)
    assert t.view is not None
    welcome = t.view.welcome(add)
    joiner = _Transcript("welcome-add")
    joiner.join(welcome.encode(), "dave")
    tests.append(joiner.case("dave joins from the add that made him a member", ("Welcome",)))

    minimal = Welcome(add, (before.current,))
    carol_welcome = welcome.encode()
    t2 = _Transcript("welcome-forged")
    t2.join(carol_welcome, "carol", comment="dave's welcome offered to carol")
    tampered_states = list(unpack(welcome.encode(), what="test"))
    snapshot = unpack(tampered_states[2][-1], what="test")
    snapshot[5] = "tampered title"
    tampered_states[2] = [*tampered_states[2][:-1], pack(snapshot)]
    t2.join(pack(tampered_states), "dave", comment="the add's parent snapshot altered")
    t2.join(minimal.encode(), "dave")
    tests.append(
        t2.case(
            "a welcome for someone else, with an altered snapshot; then the genuine one",
            ("ForgedWelcome", "Welcome"),
        )
    )
    return tests


def generate() -> Json:
    extra_devices: dict[str, tuple[int, ...]] = {}
    tests = _tests(extra_devices) + _welcome_tests()
    return vector_file(
        NAME,
        description=(
            "Group membership: signed control messages applied by one member on its current "
            "state, welcomes, and forged, stale or invalid changes that must be refused "
            "(changes on older states too, whatever their change ids)."
        ),
        spec=["12-groups.md"],
        notes=NOTES,
        groups=[
            {
                "type": "GroupTranscript",
                "history": MAX_GROUP_HISTORY,
                "users": _users_json(extra_devices),
                "directory": {u: h(s.encode()) for u, s in DIRECTORY.items()},
                "tests": tests,
            }
        ],
    )


# ------------------------------------------------------------------ verification


def _directory(data: Mapping[str, str]) -> dict[str, SignedDeviceList]:
    return {user: SignedDeviceList.decode(unhex(signed)) for user, signed in data.items()}


def _rebuild(group: Json, built: Json) -> bytes:
    users = group["users"]
    device_seed = users[built["author_user_id"]]["devices"][str(built["author_device_id"])]
    return ControlMessage.sign(
        IdentityKeyPair(unhex(device_seed)),
        group_id=unhex(built["group_id"]),
        parent_epoch=built["parent_epoch"],
        parent_hash=unhex(built["parent_hash"]),
        author_user_id=built["author_user_id"],
        author_device_id=built["author_device_id"],
        action=action_from_json(built),
    ).encode()


def _genesis(message: bytes, lists: dict[str, SignedDeviceList]) -> GroupUpdate:
    return Group.from_genesis(ControlMessage.decode(message), lists)


def _apply(view: Group, message: bytes, lists: dict[str, SignedDeviceList]) -> GroupUpdate:
    return view.apply(ControlMessage.decode(message), lists)


def _join(
    welcome: bytes, lists: dict[str, SignedDeviceList], user_id: str, user_identity: bytes
) -> GroupUpdate:
    return Group.join(Welcome.decode(welcome), lists, user_id=user_id, user_identity=user_identity)


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    directory = _directory(group["directory"])
    for user, signed in directory.items():
        c.equal(
            f"directory {user}",
            group["users"][user]["user_identity"],
            h(signed.device_list.user_identity),
        )
    view: Group | None = None
    for index, step in enumerate(test["steps"]):
        where = f"step {index} ({step['op']})"
        if "built_by" in step:
            c.equal(
                f"{where} rebuilt message", step["message"], h(_rebuild(group, step["built_by"]))
            )
            decoded = ControlMessage.decode(unhex(step["message"]))
            c.equal(f"{where} change_id", step["change_id"], h(decoded.change_id))
        lists = {**directory, **_directory(step.get("directory", {}))}
        current = view
        if step["op"] == "genesis":
            update = c.outcome(where, step, partial(_genesis, unhex(step["message"]), lists))
        elif step["op"] == "apply":
            assert current is not None
            update = c.outcome(where, step, partial(_apply, current, unhex(step["message"]), lists))
        elif step["op"] == "join":
            join = partial(
                _join, unhex(step["welcome"]), lists, step["user_id"], unhex(step["user_identity"])
            )
            update = c.outcome(where, step, join)
        else:
            c.fail(f"{where}: unknown op")
            continue
        if update is not None:
            view = update.group
            expected = {k: step[k] for k in ("state", "events")}
            c.equal(f"{where} update", expected, _update_json(update))
        else:
            c.equal(
                f"{where} state unchanged", step["state"], None if view is None else view_json(view)
            )
    return c.failures


def sample_welcome() -> tuple[ControlMessage, Welcome]:
    """An add (on a state of epoch 1) and its welcome, for wire.json."""
    t = _started("wire sample")
    t.apply(t.propose("alice", SetTitle("sample")))
    add = t.propose("alice", AddMember("dave", _identity("dave")))
    t.apply(add)
    assert t.view is not None
    return add, t.view.welcome(add)
