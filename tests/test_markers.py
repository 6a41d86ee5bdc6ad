"""tests/conftest.py's SLOW list names tests that exist (a renamed test must not silently become fast-run)."""
import ast
from pathlib import Path

from tests.conftest import SLOW, is_slow

TESTS = Path(__file__).resolve().parent


def test_every_slow_entry_names_existing_tests():
    stale = []
    for prefix in SLOW:
        file, _, name = prefix.partition('::')
        path = TESTS / file
        functions = [n.name for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.FunctionDef)] if path.is_file() else []
        if not functions or (name and not any(f.startswith(name) for f in functions)):
            stale.append(prefix)
    assert stale == []


def test_is_slow_matches_files_and_prefixes_only():
    assert is_slow('tests/test_ddp.py::test_anything')
    assert is_slow('tests/test_train.py::test_kill_9_then_start_from_continues_exactly')
    assert not is_slow('tests/test_train.py::test_cider_reward_weight_scales_the_reward')
    assert not is_slow('tests/test_ddp.pyx::test_anything')
