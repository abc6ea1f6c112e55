"""Fail CI when a test skipped that must run there.

    python .ci/check_skips.py JUNIT_XML .ci/allowed_skips.txt

Reads the skips of a pytest run from its JUnit XML (`--junitxml`; `.ci/run` asks for one) and
compares each with the allow-list: one skip per line, `tests/FILE.py::TEST | REASON`, the test
without its parameters and the reason exactly as pytest reports it; lines starting with `#` are comments. A skip
that is not listed (a missing extra, absent data, a new skip nobody reviewed) is printed with its
reason and the exit code is 1. Listed skips that did not happen (the test ran, on a machine
that has what it needs) are fine.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_id(classname: str, name: str) -> str:
    """`tests/test_x.py::test_name` from JUnit's classname (`tests.test_x` or `tests.test_x.TestClass`)."""
    parts = classname.split(".") if classname else []
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (ROOT / path).is_file():
            return "::".join([path, *parts[cut:], re.sub(r"\[.*\]$", "", name)])
    return f"{classname}::{name}" if classname else name  # a module skipped while being collected


def read_allowed(path: Path) -> set[tuple[str, str]]:
    allowed = set()
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        test, sep, reason = line.partition(" | ")
        if not sep or not test.strip() or not reason.strip():
            raise SystemExit(f"{path}:{n}: not `tests/FILE.py::TEST | REASON`: {raw}")
        allowed.add((test.strip(), reason.strip()))
    return allowed


def skips(junit: Path) -> list[tuple[str, str]]:
    found = []
    for case in ET.parse(junit).iter("testcase"):
        for skipped in case.findall("skipped"):
            found.append((test_id(case.get("classname", ""), case.get("name", "")), (skipped.get("message") or "").strip()))
    return found


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    junit, allow_file = Path(sys.argv[1]), Path(sys.argv[2])
    allowed = read_allowed(allow_file)
    found = skips(junit)
    bad = sorted({s for s in found if s not in allowed})
    for test, reason in bad:
        print(f"skipped, not allowed in CI: {test}: {reason}", file=sys.stderr)
    if bad:
        print(
            f"{len(bad)} skip(s) not in {allow_file.name}: fix what the test lacks, or list the skip there if it is meant", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
