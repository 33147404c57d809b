"""format: one display per kind of number, the same in the CLI tables and the report."""

from __future__ import annotations

import math

from vitport.format import pct, pct_column


def test_percentages_have_three_significant_digits():
    assert pct(0.01069) == "1.07%"
    assert pct(0.0007673) == "0.0767%"
    assert pct(0.09996) == "10.0%"  # counted after rounding
    assert pct(12.34) == "1230%"  # never e-notation above 0.001%
    assert pct(0.0) == "0%"
    assert (pct(None), pct(math.nan), pct(math.inf)) == ("n/a", "n/a", "inf")


def test_tiny_percentages_are_scientific():
    assert pct(9.374e-7) == "9.37e-05%"
    assert pct(1.239e-6) == "1.24e-04%"  # was 0.0001239%, beside 9.374e-05%


def test_a_column_never_mixes_notations():
    column = pct_column([0.01069, 9.374e-7, 0.0, None])
    assert column == ["1.07e+00%", "9.37e-05%", "0%", "n/a"]
    assert pct_column([0.01069, 0.0007673]) == ["1.07%", "0.0767%"]
