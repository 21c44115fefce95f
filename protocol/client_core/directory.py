"""The device directory: every user's signed device list, and identity changes.

A peer device is used only if a device list signed by its user's identity
names it, with the device's proof that it belongs to that user
(spec/11-devices.md). A list signed by another identity than the one held is
never taken silently: it waits in ``pending_identity`` until the app
confirms it. A device key belongs to one user: a list naming a key that a
list held for another user names is refused (DUPLICATE_DEVICE_KEY).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..devices import (
    DeviceList,
    SignedDeviceList,
    check_device_keys,
    check_update,
    device_changes,
)
from ..errors import InvalidState, StaleChange, UnauthorizedChange, UntrustedIdentity
from ..fingerprint import SafetyNumber
from .events import Address, DeviceAdded, DeviceRemoved, Event, IdentityChanged
from .records import RecordKey
from .state import CoreState


class DeviceListNeeded(InvalidState):
    """Sending needs this user's device list first: fetch it from the relay."""

    code = "DEVICE_LIST_NEEDED"

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(f"no device list for {user_id!r}")


@dataclass(frozen=True, slots=True)
class DeviceListChange:
    """What taking a device list did, for whoever depends on device lists."""

    user_id: str
    events: tuple[Event, ...] = ()
    # Whether a new list now stands for the user (else nothing but a pending
    # identity change was recorded).
    accepted: bool = False
    # Devices the new list no longer names.
    removed: tuple[Address, ...] = ()


class Directory:
    """Device lists held for every user we talk to, our own included."""

    def __init__(self, state: CoreState) -> None:
        self._state = state

    def device_list(self, user_id: str) -> DeviceList | None:
        held = self._state.device_lists.get(user_id)
        return None if held is None else held.device_list

    def devices_of(self, user_id: str) -> tuple[Address, ...]:
        held = self.device_list(user_id)
        if held is None:
            raise DeviceListNeeded(user_id)
        return tuple([Address(user_id, d.device_id) for d in held.devices])

    def own_other_devices(self) -> list[Address]:
        own = self._state.address
        return [a for a in self.devices_of(own.user_id) if a != own]

    def knows_device(self, address: Address) -> bool:
        held = self.device_list(address.user_id)
        return held is not None and held.device(address.device_id) is not None

    def process_device_list(self, data: bytes, *, user_id: str | None = None) -> DeviceListChange:
        """Take a signed device list from the relay (verified here, never trusted);
        ``user_id``: the user it must be of (UnauthorizedChange otherwise)."""
        state = self._state
        signed = SignedDeviceList.decode(data)
        new = signed.device_list
        if user_id is not None and new.user_id != user_id:
            raise UnauthorizedChange(f"a device list of another user than {user_id!r}")
        if new.user_id == state.user_id and new.user_identity != state.user_identity_public:
            raise UntrustedIdentity("a device list for our own user with another identity")
        self._check_device_keys(new)
        old_signed = state.device_lists.get(new.user_id)
        old = None if old_signed is None else old_signed.device_list
        try:
            check_update(old, new)
        except StaleChange:
            return DeviceListChange(new.user_id)  # the list we hold is as new or newer
        except UntrustedIdentity:
            assert old is not None
            state.pending_identity[new.user_id] = signed
            state.mark(RecordKey.pending_identity(new.user_id))
            return DeviceListChange(
                new.user_id,
                events=(IdentityChanged(new.user_id, old.user_identity, new.user_identity),),
            )
        return self.accept(signed, old)

    def withdraw_first(self, user_id: str) -> None:
        """Forget the first list of ``user_id`` just taken, as if it had never come. Its
        record was not marked before it came: no list is removed but by this method."""
        del self._state.device_lists[user_id]
        self._state.changed.discard(RecordKey.devices(user_id))

    def pending_identity(self, user_id: str) -> IdentityChanged | None:
        """The identity change waiting for :meth:`confirm_identity`, if any."""
        pending = self._state.pending_identity.get(user_id)
        held = self.device_list(user_id)
        if pending is None or held is None:
            return None
        return IdentityChanged(user_id, held.user_identity, pending.device_list.user_identity)

    def confirm_identity(self, user_id: str) -> DeviceListChange:
        """Take the list of a changed identity the app confirmed, in place of the one held."""
        state = self._state
        signed = state.pending_identity.get(user_id)
        if signed is None:
            raise InvalidState(f"no identity change pending for {user_id!r}")
        self._check_device_keys(signed.device_list)
        del state.pending_identity[user_id]
        state.mark(RecordKey.pending_identity(user_id))
        return self.accept(signed, None, replaced=state.device_lists.get(user_id))

    def _check_device_keys(self, new: DeviceList) -> None:
        """DuplicateDeviceKey if another user's held list names one of ``new``'s device keys."""
        check_device_keys(new, (held.device_list for held in self._state.device_lists.values()))

    def accept(
        self,
        signed: SignedDeviceList,
        old: DeviceList | None,
        *,
        replaced: SignedDeviceList | None = None,
    ) -> DeviceListChange:
        """Hold ``signed`` for its user; the devices added and removed since ``old``
        (``replaced``: since the list of the identity it replaces)."""
        new = signed.device_list
        if replaced is not None:
            old = replaced.device_list
        changes = device_changes(old, new)
        self._state.device_lists[new.user_id] = signed
        self._state.mark(RecordKey.devices(new.user_id))
        removed = tuple(Address(new.user_id, entry.device_id) for entry in changes.removed)
        events: list[Event] = [DeviceRemoved(address) for address in removed]
        if old is not None:
            events += [DeviceAdded(Address(new.user_id, e.device_id)) for e in changes.added]
        return DeviceListChange(new.user_id, tuple(events), accepted=True, removed=removed)

    def sign_own_change(self, change: Callable[[DeviceList], DeviceList]) -> SignedDeviceList:
        """(Primary only.) Our device list changed by ``change``, signed by the user identity."""
        state = self._state
        if state.user_identity is None:
            raise InvalidState("only the device holding the user identity can change devices")
        current = state.device_lists.get(state.user_id)
        if current is None:
            raise InvalidState("no device list yet")
        return change(current.device_list).sign(state.user_identity)

    def safety_number(self, user_id: str, *, pending: bool = False) -> SafetyNumber:
        """The safety number with ``user_id``'s trusted identity (``pending``: with the
        changed identity waiting for confirmation, to compare before confirming)."""
        held = self.device_list(user_id)
        if held is None:
            raise DeviceListNeeded(user_id)
        identity = held.user_identity
        if pending:
            change = self._state.pending_identity.get(user_id)
            if change is None:
                raise InvalidState(f"no identity change pending for {user_id!r}")
            identity = change.device_list.user_identity
        return SafetyNumber.compute(
            self._state.user_id, self._state.user_identity_public, user_id, identity
        )
