"""The numerics rules of the kernel tests, in one place (importable from every test folder).

The oracle is the op's reference run in float64 (inputs upcast). Two ways to compare with it:

* `assert_close(actual, expected, rtol)`: max |actual - expected| <= rtol * max |expected| + atol,
  the max-norm relative error (used where the kernel computes in float32 from the same values);
* `assert_2x_rule(name, got, low, exact)`: the kernel's error is at most 2x the error of the
  reference itself run in the same low precision on the same inputs, plus a floor
  (flash-attention's rule): err(got, exact) <= 2 * err(low, exact) + floor + rel_floor * max |exact|.
  `eps_floor` gives the usual floor: a fraction of one unit of roundoff of a dtype at the scale.

NaN policy (both): non-finite values must match position for position (NaN where the oracle has
NaN, the same infinity where it has an infinity, e.g. lse = -inf on rows in no segment), and
nowhere else; the errors are then measured on the positions where the oracle is finite.
"""

from __future__ import annotations

import torch


def finite_parts(name: str, actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(actual, expected) as float64 CPU tensors at the positions where `expected` is finite, after
    checking the shapes and the NaN policy (module docstring)."""
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN positions differ from the reference"
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], e[inf]), (
        f"{name}: infinities differ from the reference")
    finite = torch.isfinite(e)
    return a[finite], e[finite]


def max_error(name: str, actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|) over the finite positions (0.0, 0.0 if none)."""
    a, e = finite_parts(name, actual, expected)
    if e.numel() == 0:
        return 0.0, 0.0
    return (a - e).abs().max().item(), e.abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "", atol: float = 0.0) -> None:
    """max |actual - expected| <= rtol * max |expected| + atol, with the NaN policy."""
    err, scale = max_error(name, actual, expected)
    assert err <= rtol * scale + atol, f"{name}: max err {err:.3e} > {rtol:.0e} * {scale:.3e} + {atol:.0e}"


def eps_floor(dtype: torch.dtype, expected: torch.Tensor, ulps: float = 1.0) -> float:
    """`ulps` units of roundoff (torch.finfo(dtype).eps) at the largest finite magnitude of expected."""
    e = expected.detach().double()
    e = e[torch.isfinite(e)]
    scale = e.abs().max().item() if e.numel() else 0.0
    return torch.finfo(dtype).eps * ulps * scale


def assert_2x_rule(name: str, got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor,
                   floor: float = 0.0, rel_floor: float = 0.0) -> None:
    """err(got, exact) <= 2 * err(low, exact) + floor + rel_floor * max |exact|, where `low` is the
    reference run in the kernel's precision and `exact` the float64 oracle; NaN policy for both."""
    err, scale = max_error(name, got, exact)
    ref_err, _ = max_error(f"{name} (low-precision reference)", low, exact)
    bound = 2 * ref_err + floor + rel_floor * scale
    assert err <= bound, (f"{name}: error {err:.3e} > 2 x the low-precision reference's {ref_err:.3e} "
                          f"+ floor {floor + rel_floor * scale:.3e}")


__all__ = ["assert_2x_rule", "assert_close", "eps_floor", "finite_parts", "max_error"]
