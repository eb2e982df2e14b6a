"""Builds gate inputs for a test case and runs an implementation forward and backward."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

import retrieval_attention
from retrieval_attention import reference

from tolerances import assert_close_to_truth

GRAD_NAMES = ("h", "k", "v", "w_q", "w_k")


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]
    G: int
    D: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    weights: str = "both"  # both, none, q, k, float32 (float32 weights with the input dtype's activations)
    layout: str = "contiguous"  # contiguous, strided, inner_strided, fused_kv
    residual: bool = False
    mask: bool = False
    signed_sqrt: bool = True
    scale: float | None = None
    eps: float | None = None
    grad_o: bool = True
    grad_a: bool = True

    @property
    def options(self) -> dict:
        return {"signed_sqrt": self.signed_sqrt, "scale": self.scale, "residual": self.residual}


def make_leaves(case: Case) -> dict[str, torch.Tensor | None]:
    """The tensors gradients are taken against; ``views`` turns them into h, k, v."""
    opts = {"dtype": case.dtype, "device": case.device}
    lead, G, D = case.lead, case.G, case.D
    leaves: dict[str, torch.Tensor | None] = {}
    if case.layout == "fused_kv":  # v and the keys are slices of one projection output
        leaves["kv"] = torch.randn(*lead, (G + 1) * D, **opts)
    elif case.layout == "strided":  # branch-major storage, viewed token-major
        leaves["h"] = torch.randn(G, *lead, D, **opts)
        leaves["k"] = torch.randn(G, *lead, D, **opts)
    elif case.layout == "inner_strided":  # every other element along D
        leaves["h"] = torch.randn(*lead, G, 2 * D, **opts)
        leaves["k"] = torch.randn(*lead, G, 2 * D, **opts)
    else:
        leaves["h"] = torch.randn(*lead, G, D, **opts)
        leaves["k"] = torch.randn(*lead, G, D, **opts)
    if case.layout == "fused_kv":
        leaves["h"] = torch.randn(*lead, G, D, **opts)
    else:
        leaves["v"] = torch.randn(*lead, D, **opts)
    wdtype = torch.float32 if case.weights == "float32" else case.dtype
    for name, present in (("w_q", case.weights != "k"), ("w_k", case.weights != "q")):
        present = present and case.weights != "none"
        leaves[name] = (1 + 0.5 * torch.randn(G, D, device=case.device)).to(wdtype) if present else None
    for t in leaves.values():
        if t is not None:
            t.requires_grad_(True)
    return leaves


def views(case: Case, leaves: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    G, D = case.G, case.D
    if case.layout == "fused_kv":
        kv = leaves["kv"]
        v, k = kv[..., :D], kv[..., D:].unflatten(-1, (G, D))
        return leaves["h"], k, v
    if case.layout == "strided":
        return leaves["h"].movedim(0, -2), leaves["k"].movedim(0, -2), leaves["v"]
    if case.layout == "inner_strided":
        return leaves["h"][..., ::2], leaves["k"][..., ::2], leaves["v"]
    return leaves["h"], leaves["k"], leaves["v"]


def as_float64(leaves: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {n: None if t is None else t.detach().double().requires_grad_(True) for n, t in leaves.items()}


def run(
    case: Case,
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    leaves: dict[str, torch.Tensor | None],
    grad_o: torch.Tensor,
    grad_a: torch.Tensor,
    mask: torch.Tensor | None,
    **kwargs,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Forward, then the gradients of <o, grad_o> + <a, grad_a> with respect to every leaf."""
    h, k, v = views(case, leaves)
    o, a = fn(h, k, v, leaves["w_q"], leaves["w_k"], mask=mask, **case.options, **kwargs)
    outputs, grads_out = [], []
    if case.grad_o:
        outputs.append(o)
        grads_out.append(grad_o.to(o.dtype))
    if case.grad_a:
        outputs.append(a)
        grads_out.append(grad_a.to(a.dtype))
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(outputs, [leaves[n] for n in names], grads_out, allow_unused=True)
    return [o.detach(), a.detach()], {
        n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads, strict=True)
    }


def check_against_reference(case: Case, impl: Callable = retrieval_attention.gate) -> None:
    """Runs ``impl`` and the reference in float64 and in the input precision; compares all."""
    leaves = make_leaves(case)
    mask = torch.rand(case.lead, device=case.device) > 0.3 if case.mask else None
    grad_o = torch.randn(*case.lead, case.G, case.D, dtype=torch.float64, device=case.device)
    grad_a = torch.randn(*case.lead, case.G, dtype=torch.float64, device=case.device)
    eps = torch.finfo(case.dtype).eps if case.eps is None else case.eps

    ours = run(case, impl, leaves, grad_o, grad_a, mask, eps=case.eps)
    truth = run(case, reference.gate, as_float64(leaves), grad_o, grad_a, mask, eps=eps)
    same = run(case, reference.gate, leaves, grad_o, grad_a, mask, eps=eps)

    assert ours[0][0].dtype == case.dtype
    assert ours[0][1].dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
    for i, what in enumerate(("o", "a")):
        assert_close_to_truth(ours[0][i], truth[0][i], same[0][i], case.dtype, what)
    # As D -> 1 a normalized row tends to +-1 and the gradients into h and k cancel to nearly
    # zero; their scale is floored at that of the value's gradient, which does not cancel.
    value_grad = truth[1]["kv" if case.layout == "fused_kv" else "v"]
    floor = value_grad.abs().max().item() if value_grad.numel() else 0.0
    for name, grad in ours[1].items():
        assert grad.dtype == leaves[name].dtype, f"grad of {name}: {grad.dtype} != {leaves[name].dtype}"
        cancels = name in ("h", "k")
        assert_close_to_truth(
            grad, truth[1][name], same[1][name], case.dtype, f"grad {name}", scale_floor=floor if cancels else 0.0
        )


def shape_ids(shapes: Sequence[tuple]) -> list[str]:
    return [f"lead{lead}-G{G}-D{D}" for lead, G, D in shapes]
