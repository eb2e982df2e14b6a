"""Every tolerance of the tests, in one table keyed by kind and dtype (docs/accuracy.md explains them)."""

from __future__ import annotations

from collections import defaultdict

import torch

# Allowed errors as a fraction of the expected value's largest magnitude (max norm), unless said otherwise.
TOLERANCE: dict[str, dict[torch.dtype, float]] = {
    # The tolerance term of the fair bound against the float64 reference; also what two computations of
    # the same values in one precision may differ by (compiled and eager, CUDA and CPU, module and reference).
    "reference": {
        torch.float64: 1e-10,
        torch.float32: 1e-5,
        torch.float16: 1e-2,
        torch.bfloat16: 2e-2,
    },
    # torch.autograd.gradcheck's absolute tolerance on float64 central differences of step FINITE_DIFFERENCE_STEP.
    "finite_differences": {torch.float64: 1e-7},
    # A float32 sum over ~10^7 rows against the same sum grouped otherwise (the large-tensor tests).
    "regrouped_sum": {torch.float32: 1e-3},
}
FINITE_DIFFERENCE_STEP = 1e-6

# Worst error seen per dtype, as a fraction of the output's scale; printed at the end of the run.
WORST: dict[torch.dtype, float] = defaultdict(float)


def tolerance(dtype: torch.dtype, kind: str = "reference") -> float:
    return TOLERANCE[kind][dtype]


def coarser(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise of the floating dtypes."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def assert_close_to_truth(
    actual: torch.Tensor,
    truth: torch.Tensor,
    same_precision: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    scale_floor: float = 0.0,
) -> None:
    """The fair bound: |actual - truth| <= 2 * |same_precision - truth| + tol * scale, in max norm.

    ``truth`` is the float64 reference; ``same_precision`` the reference computed in the
    input's own precision (float32 for the half types), which bounds what any kernel of
    that precision can know about rows with large gradients (scores near zero).
    ``scale_floor`` is for outputs that cancel to nearly zero in exact arithmetic.
    """
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    truth = truth.double()
    scale = max(truth.abs().max().item(), scale_floor, 1e-30)
    err = (actual.double() - truth).abs().max().item()
    err_ref = (same_precision.double() - truth).abs().max().item()
    tol = tolerance(dtype)
    # Reported under the coarser of the two precisions (a float32 weight's gradient beside float64 inputs).
    worst_dtype = coarser(dtype, actual.dtype)
    WORST[worst_dtype] = max(WORST[worst_dtype], err / scale)
    assert err <= 2 * err_ref + tol * scale, (
        f"{what} ({dtype}): max error {err:.3e} > 2 * reference error {err_ref:.3e} + {tol:g} * scale {scale:.3e}"
    )


def assert_agree(
    actual: torch.Tensor,
    expected: torch.Tensor,
    what: str = "",
    dtype: torch.dtype | None = None,
    kind: str = "reference",
) -> None:
    """|actual - expected| <= tol * max|expected| in max norm (a NaN anywhere fails).

    ``dtype`` is the precision the values were computed in, which picks the tolerance; by default
    the coarser of the two tensors' dtypes.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    dtype = dtype or coarser(actual.dtype, expected.dtype)
    tol = tolerance(dtype, kind)
    expected = expected.detach().double().to(actual.device)
    scale = expected.abs().max().item()
    err = (actual.detach().double() - expected).abs().max().item()
    assert err <= tol * scale, f"{what} ({dtype}): max difference {err:.3e} > {tol:g} * scale {scale:.3e}"
