"""No test may pass by not running: the suite has no skips, xfails or optional imports.

A skipped test reads as green in a summary that nobody scrolls, so a moved module
(``pytest.importorskip("streamlit.testing.v1")`` once guarded the dashboard tests) or a missing
binary would silently drop whole files. Every dependency the tests use is required (the
project's dependencies or its ``test`` extra), so each is imported plainly and a missing one is
an error. Read from the source, so the check holds for tests that are not collected in a run.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: The pytest names that let a test end without having asserted anything.
SKIPPING = {"importorskip", "skip", "skipif", "xfail"}


def _skips(path: Path) -> list[str]:
    """``file:line name`` for every use of a skipping pytest name (a call, a mark or a decorator)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in SKIPPING:
            found.append((node.lineno, f"{path.name}:{node.lineno} {node.attr}"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pytest":
            found += [(node.lineno, f"{path.name}:{node.lineno} {a.name}") for a in node.names if a.name in SKIPPING]
    return [hit for _, hit in sorted(found)]


def test_the_checker_finds_each_skipping_form(tmp_path):
    """The check itself can fail: each form it forbids is found in a planted file."""
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "import pytest\n"
        "st = pytest.importorskip('streamlit')\n"
        "@pytest.mark.skipif(True, reason='x')\n"
        "def test_a(): pytest.skip('no')\n"
        "@pytest.mark.xfail\n"
        "def test_b(): pass\n"
        "@pytest.mark.skip\n"
        "def test_c(): pass\n"
        "from pytest import importorskip\n")
    assert _skips(planted) == ["test_planted.py:2 importorskip", "test_planted.py:3 skipif",
                               "test_planted.py:4 skip", "test_planted.py:5 xfail", "test_planted.py:7 skip",
                               "test_planted.py:9 importorskip"]


def test_no_test_file_skips():
    """Every test module and helper under tests/ (bench scripts included) is free of skips."""
    files = sorted(TESTS.rglob("*.py"))
    assert TESTS / "test_dashboard.py" in files  # the glob reads this tree, not an empty one
    found = [f"{f.parent.name}/{hit}" for f in files for hit in _skips(f)]
    assert found == [], "skips hide failures; import required dependencies plainly:\n" + "\n".join(found)
