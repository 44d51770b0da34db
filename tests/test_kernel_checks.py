"""The comparison helpers for discontinuous kernels (tests/kernel_checks.py), on the CPU."""

import pytest
import torch

from tests.kernel_checks import assert_flips, assert_rel_bracketed, bracket, ulp32


def test_ulp32_is_the_fp32_spacing():
    t = torch.tensor([1.0, 1.5, 0.3, -1000.0, 2.0**-130])
    spacing = (torch.nextafter(t.abs(), torch.tensor(float("inf"))) - t.abs()).double()
    torch.testing.assert_close(ulp32(t), spacing, rtol=0, atol=0)


def _step_case(n=10000):
    """An fp32 step H(z - θ) next to float64's: z = a + b rounded to fp32 versus exact."""
    a, b = torch.randn(n), 0.1 * torch.randn(n)
    theta = (a + b).clone()  # θ on the computed z: every decision hinges on the last bit
    theta[n // 2 :] = 0.5
    z64 = a.double() + b.double()
    near = (z64 - theta.double()).abs() <= 2 * ulp32(a.abs() + b.abs())
    return a + b > theta, z64 > theta.double(), near


def test_flips_inside_the_band_are_counted_and_accepted():
    out_on, ref_on, near = _step_case()
    flips = assert_flips(out_on, ref_on, near, "H")
    assert 0 < flips == (out_on != ref_on).sum()


def test_a_flip_outside_the_band_fails():
    out_on, ref_on, near = _step_case()
    far = (~near).nonzero()[0, 0]
    out_on[far] = ~out_on[far]
    with pytest.raises(AssertionError, match="outside the rounding band"):
        assert_flips(out_on, ref_on, near, "H")


def test_bracket_covers_every_choice_inside_the_band_only():
    torch.manual_seed(0)
    v = torch.randn(50, 8, dtype=torch.float64)
    ref_on = torch.rand(50, 8) > 0.5
    near = (torch.rand(50, 8) > 0.8) & (torch.arange(8) < 4)  # free decisions in sums 0-3
    lo, hi = bracket(v, ref_on, near, dim=0)
    for _ in range(20):  # any choice of the free decisions is accepted, at zero tolerance
        choice = torch.where(near, torch.rand(50, 8) > 0.5, ref_on)
        assert_rel_bracketed(torch.where(choice, v, 0).sum(0), lo, hi, 1e-12, "sum")
    flipped = ref_on.clone()
    i = v[:, 6].abs().argmax()
    flipped[i, 6] = ~flipped[i, 6]  # one decision flipped in a sum with none free
    with pytest.raises(AssertionError, match="beyond the rounding band"):
        assert_rel_bracketed(torch.where(flipped, v, 0).sum(0), lo, hi, 1e-3, "sum")


def test_bracket_elementwise_and_the_tolerance_outside_it():
    v = torch.tensor([1.0, -2.0, 3.0])
    lo, hi = bracket(v, torch.tensor([True, True, False]), torch.tensor([False, True, True]))
    torch.testing.assert_close(lo, torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(hi, torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))
    assert_rel_bracketed(torch.tensor([1.0 + 1e-7, -1.0, 0.0]), lo, hi, 1e-6, "x")
    with pytest.raises(AssertionError):
        assert_rel_bracketed(torch.tensor([1.1, -1.0, 0.0]), lo, hi, 1e-6, "x")
