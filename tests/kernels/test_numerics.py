"""The shared tolerance rules (tests/numerics.py) accept what they should and refuse the rest."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_2x_rule, assert_close, eps_floor, max_error

NAN, INF = float("nan"), float("inf")


def test_nan_policy_matches_position_for_position():
    exact = torch.tensor([1.0, NAN, -INF, 2.0], dtype=torch.float64)
    assert max_error("ok", torch.tensor([1.0, NAN, -INF, 2.5]), exact) == (0.5, 2.0)
    with pytest.raises(AssertionError, match="NaN positions"):
        max_error("moved", torch.tensor([NAN, 1.0, -INF, 2.0]), exact)
    with pytest.raises(AssertionError, match="NaN positions"):
        max_error("extra", torch.tensor([1.0, NAN, -INF, NAN]), exact)
    with pytest.raises(AssertionError, match="infinities"):
        max_error("sign", torch.tensor([1.0, NAN, INF, 2.0]), exact)
    with pytest.raises(AssertionError, match="infinities"):
        max_error("overflow", torch.tensor([INF, NAN, -INF, 2.0]), exact)
    with pytest.raises(AssertionError, match="shape"):
        max_error("shape", torch.zeros(3), exact)


def test_assert_close_is_max_norm_relative():
    exact = torch.tensor([100.0, 1.0], dtype=torch.float64)
    assert_close(torch.tensor([100.0, 1.0009]), exact, 1e-5)  # 9e-4 <= 1e-5 * 100
    with pytest.raises(AssertionError, match="max err"):
        assert_close(torch.tensor([100.0, 1.002]), exact, 1e-5)
    assert_close(torch.tensor([100.0, 1.002]), exact, 1e-5, atol=1e-3)


def test_two_x_rule():
    exact = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    low = exact + torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)  # the reference's own error
    assert_2x_rule("ok", exact + 1.9e-3, low, exact)
    with pytest.raises(AssertionError, match="2 x the low-precision"):
        assert_2x_rule("too far", exact + 2.5e-3, low, exact)
    assert_2x_rule("floor", exact + 2.5e-3, low, exact, floor=6e-4)
    assert_2x_rule("relative floor", exact + 2.5e-3, low, exact, rel_floor=2e-4)  # 2e-4 * 3
    # an exact low-precision reference leaves only the floor
    with pytest.raises(AssertionError):
        assert_2x_rule("exact ref", exact + 1e-9, exact, exact)


def test_eps_floor_ignores_non_finite_values():
    e = torch.tensor([0.5, -4.0, -INF, NAN])
    assert eps_floor(torch.float16, e) == torch.finfo(torch.float16).eps * 4.0
    assert eps_floor(torch.bfloat16, e, ulps=0.125) == torch.finfo(torch.bfloat16).eps * 0.5
