"""The published vectors and the spec agree with the implementation.

* regenerating vectors/ reproduces the committed files byte for byte;
* every committed test verifies (one pytest case per ``file:tcId``);
* the verifier notices a wrong expected value (so the checks above can fail);
* spec/01-parameters.md's table states exactly the values of protocol/consts.py;
* spec/08-errors.md lists every error code but the relay's wire codes (spec/07).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from hushchat.devtools import testvectors
from hushchat.protocol import consts
from hushchat.protocol.errors import all_error_classes
from hushchat.transport.cli import main
from hushchat.transport.wire.errors import RELAY_ERROR_CLASSES
from tests.support.paths import REPO

ROOT = REPO
VECTORS = ROOT / "vectors"
SPEC = ROOT / "spec"


def _load(filename: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / filename).read_text(encoding="utf-8"))
    return data


def _cases() -> list[Any]:
    cases = []
    for vector_file in testvectors.FILES:
        path = VECTORS / vector_file.filename
        if not path.exists():
            continue
        for group, test in testvectors.iter_tests(_load(vector_file.filename)):
            cases.append(
                pytest.param(
                    vector_file.filename, group, test, id=f"{vector_file.filename}:{test['tcId']}"
                )
            )
    return cases


@pytest.fixture(scope="module")
def generated() -> dict[str, dict[str, Any]]:
    return testvectors.generate_all()


# ------------------------------------------------------------------ vectors


def test_the_committed_files_are_exactly_the_generated_ones() -> None:
    committed = {path.name for path in VECTORS.glob("*.json")}
    assert committed == {f.filename for f in testvectors.FILES}


@pytest.mark.parametrize("filename", [f.filename for f in testvectors.FILES])
def test_regeneration_is_byte_identical(
    filename: str, generated: dict[str, dict[str, Any]]
) -> None:
    text = (VECTORS / filename).read_text(encoding="utf-8")
    assert testvectors.render(generated[filename]) == text, (
        f"vectors/{filename} is stale: run 'hushchat vectors generate vectors' and review the diff"
    )


@pytest.mark.parametrize("filename", [f.filename for f in testvectors.FILES])
def test_headers(filename: str) -> None:
    assert testvectors.verify_header(filename, _load(filename)) == []


@pytest.mark.parametrize(("filename", "group", "test"), _cases())
def test_vector(filename: str, group: dict[str, Any], test: dict[str, Any]) -> None:
    assert testvectors.verify_test(filename, group, test) == []


def _first_hex_string(value: Any, skip: str = "") -> list[Any] | None:
    """A path to the first hex string (not under key ``skip``) in a test, for tampering."""
    if isinstance(value, dict):
        for key in sorted(value):
            if key in ("comment", "result", "error", "flags", skip):
                continue
            path = _first_hex_string(value[key], skip)
            if path is not None:
                return [key, *path]
    if isinstance(value, list):
        for index, item in enumerate(value):
            path = _first_hex_string(item, skip)
            if path is not None:
                return [index, *path]
    if isinstance(value, str) and len(value) >= 2 and re.fullmatch(r"(?:[0-9a-f]{2})+", value):
        return []
    return None


@pytest.mark.parametrize("filename", [f.filename for f in testvectors.FILES])
def test_the_verifier_notices_a_changed_value(filename: str) -> None:
    data = _load(filename)
    for group, test in testvectors.iter_tests(data):
        if test["result"] != "valid":
            continue
        changed = copy.deepcopy(test)
        path = _first_hex_string(changed)
        assert path is not None
        parent: Any = changed
        for key in path[:-1]:
            parent = parent[key]
        value = parent[path[-1]]
        parent[path[-1]] = ("1" if value[0] == "0" else "0") + value[1:]
        assert testvectors.verify_test(filename, group, changed) != []
        return
    pytest.fail("no valid test to tamper with")


@pytest.mark.parametrize("filename", [f.filename for f in testvectors.FILES])
def test_the_verifier_notices_a_wrong_error(filename: str) -> None:
    data = _load(filename)
    for group, test in testvectors.iter_tests(data):
        if test["result"] != "invalid":
            continue
        changed = copy.deepcopy(test)
        target = changed
        if "steps" in changed:
            target = next(s for s in changed["steps"] if s.get("result") == "invalid")
        target["error"] = "BAD_MAC" if target["error"] != "BAD_MAC" else "DUPLICATE_MESSAGE"
        assert testvectors.verify_test(filename, group, changed) != []
        return
    pytest.fail("no invalid test")


# ------------------------------------------------------------------ command line


def _run(*argv: str) -> int:
    return main(list(argv))


def test_cli_generates_the_committed_files(tmp_path: Path) -> None:
    assert _run("vectors", "generate", str(tmp_path)) == 0
    for vector_file in testvectors.FILES:
        written = (tmp_path / vector_file.filename).read_bytes()
        assert written == (VECTORS / vector_file.filename).read_bytes()


def test_cli_verify_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("vectors", "verify") == 0
    total = sum(_load(f.filename)["numberOfTests"] for f in testvectors.FILES)
    assert capsys.readouterr().out.strip() == f"{total} passed, 0 failed"


def test_cli_verify_fails_on_a_changed_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run("vectors", "generate", str(tmp_path))
    path = tmp_path / "primitives_kdf.json"
    data = json.loads(path.read_text())
    test = data["testGroups"][0]["tests"][0]
    test["new_root_key"] = "00" * 32
    path.write_text(json.dumps(data))
    (tmp_path / "x3dh.json").unlink()
    capsys.readouterr()
    assert _run("vectors", "verify", str(tmp_path)) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("passed, 2 failed")
    assert "primitives_kdf.json:1: new_root_key" in captured.err
    assert "x3dh.json: missing" in captured.err


# ------------------------------------------------------------------ spec


def _parameter_rows() -> dict[str, str]:
    """``NAME -> value`` of every table row of spec/01-parameters.md naming a constant."""
    rows = {}
    for line in (SPEC / "01-parameters.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 3 and re.fullmatch(r"`[A-Z][A-Z0-9_]*`", cells[0]):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def _spec_value(text: str) -> int | bytes:
    """A table value: a decimal or 0x integer, "ASCII" bytes, or h'hex' bytes."""
    if match := re.fullmatch(r'"([ -~]*)"', text):
        return match.group(1).encode()
    if match := re.fullmatch(r"h'((?:[0-9a-f]{2})*)'", text):
        return bytes.fromhex(match.group(1))
    if re.fullmatch(r"0x[0-9A-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    raise AssertionError(f"unparsable value {text!r} in spec/01-parameters.md")


def test_parameters_table_states_every_constant() -> None:
    rows = _parameter_rows()
    constants = {
        name: value
        for name, value in vars(consts).items()
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and isinstance(value, int | bytes)
    }
    assert set(rows) == set(constants), "spec/01-parameters.md and protocol/consts.py differ"
    for name, text in rows.items():
        assert _spec_value(text) == constants[name], name


def test_every_error_code_is_in_the_errors_section() -> None:
    text = (SPEC / "08-errors.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\|\s*`([A-Z_]+)`\s*\|", text, flags=re.MULTILINE))
    # Every module that defines errors, so that all_error_classes() finds them all;
    # the relay's wire codes are in spec/07-relay-protocol.md section 7.10 instead.
    import hushchat.protocol.client_core
    import hushchat.transport.client
    import hushchat.transport.relay

    wire_codes = {cls.code for cls in RELAY_ERROR_CLASSES.values()}
    ours = [cls for cls in all_error_classes() if cls.__module__.startswith("hushchat.")]
    # The reasons the client core gives for input it cannot use (section 8.5).
    package = Path(hushchat.protocol.client_core.__file__).parent
    source = "".join(path.read_text(encoding="utf-8") for path in package.glob("*.py"))
    reasons = set(re.findall(r'Undecryptable\(sender, "([A-Z_]+)"', source))
    assert {"UNKNOWN_DEVICE", "UNKNOWN_ENVELOPE_KIND"} <= reasons
    assert ({cls.code for cls in ours} - wire_codes) | reasons == listed


def test_every_vector_error_code_exists() -> None:
    # The protocol's codes, and the relay's (relay.json, spec/07-relay-protocol.md).
    codes = {cls.code for cls in all_error_classes()} | set(RELAY_ERROR_CLASSES)
    for vector_file in testvectors.FILES:
        data = _load(vector_file.filename)
        for _, test in testvectors.iter_tests(data):
            errors = [test.get("error")] + [s.get("error") for s in test.get("steps", [])]
            assert {e for e in errors if e is not None} <= codes, test["tcId"]


def test_every_vector_file_names_existing_spec_sections() -> None:
    for vector_file in testvectors.FILES:
        for section in _load(vector_file.filename)["spec"]:
            text = (SPEC / section).read_text(encoding="utf-8")
            assert vector_file.filename in text, (
                f"spec/{section} does not name {vector_file.filename}"
            )


def test_the_session_generator_refuses_a_repeated_draw() -> None:
    from hushchat.devtools.testvectors import sessions
    from hushchat.devtools.testvectors._common import Recorder, seeded

    transcript = sessions._alice_bob("repeat")
    # Operations drawing from the source that made Alice's keys: her base key is her identity seed.
    transcript.rng["alice"] = Recorder(seeded("session/repeat/alice"))
    transcript.start("alice", "bob", one_time=True, kem="one_time")
    with pytest.raises(AssertionError, match="a draw repeats"):
        transcript.case("a reused draw", ())
