"""``hushchat vectors``: write the test vectors, or check vector files against this code.

``hushchat vectors generate DIR`` writes every file of vectors/ into DIR
(sorted keys, 2-space indent, final newline: byte for byte what is
committed). ``hushchat vectors verify [DIR]`` checks every test of every
file in DIR (default: the published vectors/, installed with the package as
``hushchat.vectors``) and exits non-zero if any
test disagrees, a file is missing, or a file is not a known vector file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import testvectors

# The published vector files. pyproject.toml installs the repository's vectors/
# as the data folder hushchat/vectors beside hushchat/devtools, so this path is
# right both installed (site-packages/hushchat/) and editable (the checkout).
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "vectors"
# Failures printed without --verbose; the summary line always counts them all.
SHOWN_FAILURES = 20


def add_vectors_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "vectors",
        help="generate or verify the test vectors",
        description="Write hushchat's test vectors, or check vector files against this "
        "implementation (vectors/README.md).",
    )
    actions = parser.add_subparsers(dest="vectors_action", required=True, metavar="ACTION")
    generate = actions.add_parser("generate", help="write every vector file into DIR")
    generate.add_argument("dir", type=Path, help="output directory (created if missing)")
    generate.set_defaults(run=run_generate)
    verify = actions.add_parser("verify", help="check vector files against this implementation")
    verify.add_argument(
        "dir", type=Path, nargs="?", default=DEFAULT_DIR, help="directory (default: vectors/)"
    )
    verify.add_argument("-v", "--verbose", action="store_true", help="print every failure")
    verify.set_defaults(run=run_verify)


def run_generate(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    files = testvectors.generate_all()
    for filename, data in files.items():
        (directory / filename).write_text(testvectors.render(data), encoding="utf-8")
    tests = sum(data["numberOfTests"] for data in files.values())
    print(f"wrote {len(files)} files, {tests} tests, to {directory}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if not directory.is_dir():
        print(f"hushchat vectors verify: no such folder: {directory}", file=sys.stderr)
        return 2
    passed, failed, messages = 0, 0, []
    present = {path.name for path in directory.glob("*.json")}
    # A file-level problem (unknown, missing, unreadable, bad header) counts as one failure.
    problems = [
        f"{name}: not a known vector file"
        for name in sorted(present - set(testvectors.BY_FILENAME))
    ]
    for vector_file in testvectors.FILES:
        name = vector_file.filename
        if name not in present:
            problems.append(f"{name}: missing")
            continue
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: cannot be read: {exc}")
            continue
        problems += testvectors.verify_header(name, data)
        for group, test in testvectors.iter_tests(data):
            found = testvectors.verify_test(name, group, test)
            if found:
                failed += 1
                messages += [f"{name}:{test.get('tcId')}: {failure}" for failure in found]
            else:
                passed += 1
    failed += len(problems)
    messages = problems + messages
    shown = messages if args.verbose else messages[:SHOWN_FAILURES]
    for message in shown:
        print(message, file=sys.stderr)
    if len(shown) < len(messages):
        print(f"... {len(messages) - len(shown)} more (use --verbose)", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
