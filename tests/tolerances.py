"""Tolerances against the float64 reference (SPEC §5), in one table keyed by dtype."""

from __future__ import annotations

from collections import defaultdict

import torch

TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}

# Worst error seen per dtype, as a fraction of the output's scale; printed at the end of the run.
WORST: dict[torch.dtype, float] = defaultdict(float)


def assert_close_to_truth(
    actual: torch.Tensor,
    truth: torch.Tensor,
    same_precision: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    scale_floor: float = 0.0,
) -> None:
    """SPEC §5: |actual - truth| <= 2 * |same_precision - truth| + tol * scale, in max norm.

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
    tol = TOLERANCE[dtype]
    # Reported under the coarser of the two precisions (a float32 weight's gradient beside float64 inputs).
    coarser = max(dtype, actual.dtype, key=lambda d: torch.finfo(d).eps)
    WORST[coarser] = max(WORST[coarser], err / scale)
    assert err <= 2 * err_ref + tol * scale, (
        f"{what} ({dtype}): max error {err:.3e} > 2 * reference error {err_ref:.3e} + {tol:g} * scale {scale:.3e}"
    )
