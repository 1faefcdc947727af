"""The hand-run mutation check (scripts/mutation_check.py) stays runnable: every
mutant's snippet still occurs exactly once in the file it mutates, and every test
it names exists.  A refactor that moves a snippet would otherwise make the mutant
silently "n/a" the next time someone runs the check."""
from pathlib import Path

import pytest

from test_bad_input import load_script

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = load_script("mutation_check").MUTANTS


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_snippet_occurs_once_and_its_tests_exist(mutant):
    source = (ROOT / mutant.file).read_text()
    assert source.count(mutant.old) == 1, f"{mutant.name}: snippet found {source.count(mutant.old)} times in {mutant.file}"
    assert mutant.old != mutant.new
    for test in mutant.tests:
        file, _, name = test.partition("::")
        text = (ROOT / file).read_text()
        assert name.split("[")[0] == "" or f"def {name.split('[')[0]}(" in text, f"{mutant.name}: no test {test}"
