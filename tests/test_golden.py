"""Every diagnostic's exact position, message and help, as `flowc check` prints them."""

import pytest

from flowc.diagnostics import RULES
from tests.golden import case_files, project, render

PROJECT = project()


@pytest.mark.parametrize("case", case_files(), ids=lambda p: p.stem)
def test_golden(case):
    expected = case.with_suffix(".out").read_text()
    assert render(case, PROJECT) == expected


def test_every_rule_has_a_golden_case():
    seen = set()
    for case in case_files():
        for line in case.with_suffix(".out").read_text().splitlines():
            if line.endswith("]") and ": " in line and not line.startswith(" "):
                seen.add(line.rsplit("[", 1)[1][:-1])
    assert set(RULES) == seen
