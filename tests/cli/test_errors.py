"""pipeline.errors.one_line: several problems as the one line every refusal is."""

from __future__ import annotations

import pytest

from pipeline.errors import one_line

pytestmark = pytest.mark.unit


def test_one_problem_is_the_line_itself():
    assert one_line(["shard x: truncated"]) == "shard x: truncated"


def test_the_first_problem_leads_and_the_rest_are_counted_with_where_to_see_them():
    line = one_line(["a; with a semicolon", "b", "c"], listing="`dsv4 validate D` lists them")
    assert line == "a; with a semicolon (and 2 more problem(s); `dsv4 validate D` lists them)"


def test_several_shown_are_numbered_so_their_own_semicolons_stay_readable():
    assert one_line(["x; y", "z"], show=2) == "[1/2] x; y; [2/2] z"
    assert one_line(["p", "q", "r"], show=2) == "[1/3] p; [2/3] q (and 1 more problem(s))"


def test_never_a_newline():
    assert "\n" not in one_line([f"problem {i}" for i in range(50)], show=50)
