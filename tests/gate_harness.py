"""The gate against its float64 reference: one case type, one input builder and one comparison.

A ``GateCase`` describes one example: the shapes, dtype and device, the options, the layout of each
tensor in memory, and the values (their magnitudes, zero rows, rows with a crafted score, a NaN or an
inf). ``check(case)`` builds the inputs from the case's seed, runs the gate forward and backward, and
compares the outputs and every gradient with the reference under the fair bound of docs/accuracy.md
(tests/tolerances.py), retried over summation orders where one order cannot tell. The parity matrix,
the hypothesis property, the CUDA tests and the per-CPU-capability runs all go through it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from hypothesis import currently_in_test_context, event

import retrieval_attention
from retrieval_attention import reference as ref

from tolerances import assert_close_to_truth

TENSORS = ("h", "k", "v", "w_q", "w_k", "mask")
LAYOUTS = ("contiguous", "transposed", "branch_major", "strided", "offset", "sliced", "expanded")
EXTRA_ORDERS = 128  # summation orders tried when the natural one does not bound the error (see compare)
TOKEN_OUTPUTS = ("o", "a", "h", "k", "v")  # per-token outputs and gradients: [*lead, ...]
WEIGHT_GRADS = ("w_q", "w_k")  # sums over N
GRAD_NAMES = ("h", "k", "v", "w_q", "w_k")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the gate computes in, and the dtype of its gate ``a``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class GateCase:
    lead: tuple[int, ...]
    G: int
    D: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    w_q: str = "same"  # "none", "same" (the input dtype) or "float32"
    w_k: str = "same"
    residual: bool = False
    mask: bool = False
    signed_sqrt: bool = True
    scale: float | None = None
    eps: float | None = None
    sqrt_clamp: float = 1e-6
    uses: str = "both"  # which outputs the loss uses: "both", "o" or "a"
    layouts: tuple[tuple[str, str], ...] = ()  # (tensor, layout) for any of TENSORS; the others are contiguous
    fused_kv: bool = False  # v and k are slices of one [*lead, (G + 1) * D] tensor, as a fused projection gives
    magnitude: tuple[float, float, float] = (0.0, 0.0, 0.0)  # log10 of the scale of h, k, v
    mixed_rows: bool = False  # every row its own magnitude, drawn from the dtype's range
    zero_rows: float = 0.0  # fraction of rows of h, k and v set to zero
    crafted: str = "none"  # "none", "zero_score", "near_clamp" or "cancel": rows with a chosen score, see _craft_scores
    bad: tuple[str, float, bool] | None = None  # (tensor, NaN or +-inf, whole row?) put into one row
    seed: int = 0

    @property
    def N(self) -> int:
        return math.prod(self.lead)

    @property
    def resolved_eps(self) -> float:
        return torch.finfo(self.dtype).eps if self.eps is None else self.eps

    @property
    def resolved_scale(self) -> float:
        return 1.0 / math.sqrt(self.D) if self.scale is None else self.scale

    def layout(self, name: str) -> str:
        return dict(self.layouts).get(name, "contiguous")


def laid_out(layout: str, *names: str) -> tuple[tuple[str, str], ...]:
    """``GateCase.layouts`` with the given tensors in ``layout``."""
    return tuple((name, layout) for name in names)


def magnitude_range(dtype: torch.dtype, tensor: str, eps: float | None) -> tuple[float, float]:
    """Magnitudes (log10 of a tensor's scale) where the dtype and its compute precision mean something.

    float64 takes 1e-30 to 1e4 everywhere. float16 holds only about 6e-5 (normal) to 65504, so it gets
    1e-4 to 3e3 (N(0, 1) draws up to ~6 sigma stay finite). The other types compute in float32, where
    the squares and score products of h and k below about 1e-19 underflow: the norm of such a row
    becomes 0 (0 * inf = NaN with eps = 0) and the sign of its score, which decides the signed-sqrt gate,
    is lost, while the float64 truth still knows both. So their h and k start at 1e-15, and at 1e-11 with
    eps = 0: there r = 1/rms, and the float32 reference's RMSNorm backward (r^3 overflows past 3e38) is NaN,
    so no same-precision bound exists. v, which is only multiplied, takes 1e-30 in float32 and bfloat16.
    """
    if dtype == torch.float16:
        return (-4.0, 3.5)
    if dtype in (torch.float32, torch.bfloat16) and tensor in ("h", "k"):
        return (-11.0 if eps == 0.0 else -15.0, 4.0)
    return (-30.0, 4.0)


# --------------------------------------------------------------------------------------------------
# Building the inputs: values in float64 on the CPU, rounded to the dtype, then laid out on the device.


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _weight_dtype(case: GateCase, kind: str) -> torch.dtype | None:
    return None if kind == "none" else torch.float32 if kind == "float32" else case.dtype


def _set_score(
    h: torch.Tensor, k0: torch.Tensor, direction: torch.Tensor, u: torch.Tensor, target: torch.Tensor, case: GateCase
) -> tuple[torch.Tensor, torch.Tensor]:
    """k = k0 + beta * direction with beta such that the row's score is ``target``; and which rows reach it.

    Rows are [R, D] in float64; ``u = w_q * w_k`` per row; ``k0`` has no score with h (h * u . k0 = 0)
    and is orthogonal to ``direction``. Then s(beta) = C beta / sqrt((S + beta^2 |direction|^2) / D + eps),
    C = scale * r_q * <h u, direction>, S = |k0|^2, which is solved for beta. |s| < |C| sqrt(D / |direction|^2)
    for every beta, so a row of a tiny h, or with a small scale, may not reach the target.
    """
    D, eps = case.D, case.resolved_eps
    r_q = 1.0 / torch.sqrt(h.pow(2).mean(-1) + eps)
    C = case.resolved_scale * r_q * (h * u * direction).sum(-1)
    S = k0.pow(2).sum(-1)
    denom = C.pow(2) - target.pow(2) * direction.pow(2).sum(-1) / D
    beta = target.abs() * torch.sqrt((S / D + eps) / denom) * torch.sign(target * C)
    reached = torch.isfinite(beta) & (denom > 0) & (C != 0)
    return k0 + torch.where(reached, beta, torch.zeros_like(beta))[:, None] * direction, reached


def _craft_scores(case: GateCase, h: torch.Tensor, k: torch.Tensor, w: torch.Tensor, gen: torch.Generator) -> None:
    """Rows (a random quarter) whose score is exactly zero, or near the clamp, or near zero by cancellation.

    zero_score: h and k live on disjoint coordinates, so every product is an exact zero in any precision:
        s = 0, a = 0.5 and no gradient into h, k (docs/gate.md: u = 0 and the clamp's slope is zero).
    near_clamp: the same, plus one shared coordinate set so that |s| is within a factor 30 of the clamp c.
        One product carries the whole score, so every precision knows s to a few ulps: well conditioned,
        yet the gradient has the slope 1/(2 sqrt|s|) of the signed square root, or is cut by the clamp.
    cancel: k made orthogonal to h (weighted) in float64, plus a small part along h for |s| of 1e-4 to
        1e-1 of the score k would have along h: within 0.006 to 6 degrees of orthogonal, the gradient's
        slope up to ~100. The score is a difference of O(1) terms that float64 knows to ~1e-16, so to
        1e-12 relative at 1e-4, inside float64's 1e-10; float32 would know it only to ~1e-3, and its
        gradient beyond float32's 1e-5, so float64 only. (Closer to orthogonal every precision's score is
        rounding noise, a coin toss in sign; near_clamp reaches small scores exactly instead.)
    Works in place on [NG, D] float64 views; D = 1 rows cannot be orthogonal and are left alone.
    """
    if case.crafted == "none" or case.D < 2 or h.shape[0] == 0:
        return
    R = torch.nonzero(_rand(gen, h.shape[0]) < 0.25).flatten()
    if R.numel() == 0:
        return
    D = case.D
    hr, kr, u = h[R], k[R], w[R]
    side = _rand(gen, R.numel(), D) < 0.5
    target = case.sqrt_clamp * 10.0 ** (_rand(gen, R.numel()) * 3 - 1.5) * torch.sign(_rand(gen, R.numel()) - 0.5)
    if case.crafted == "zero_score":
        hr, kr = hr * side, kr * ~side
    elif case.crafted == "near_clamp":
        j = torch.randint(0, D, (R.numel(),), generator=gen)
        shared = torch.nn.functional.one_hot(j, D).bool()
        hr, k0 = hr * (side | shared), kr * (~side & ~shared)
        kr = _set_score(hr, k0, shared.double(), u, target, case)[0]  # a row that cannot reach it keeps s = 0
    else:  # cancel
        direction = hr * u
        norm2 = direction.pow(2).sum(-1, keepdim=True)
        direction = torch.where(norm2 > 0, direction / norm2.sqrt(), torch.zeros_like(direction))
        k0 = kr - (kr * direction).sum(-1, keepdim=True) * direction
        # The score with k along the direction: sup over beta of |s(beta)| = |C| sqrt(D) (see _set_score).
        r_q = 1.0 / torch.sqrt(hr.pow(2).mean(-1) + case.resolved_eps)
        aligned = (case.resolved_scale * r_q * (hr * u * direction).sum(-1)).abs() * math.sqrt(D)
        target = torch.sign(target) * aligned * 10.0 ** (_rand(gen, R.numel()) * 3 - 4)
        k_new, reached = _set_score(hr, k0, direction, u, target, case)
        kr = torch.where(reached[:, None], k_new, kr)  # not k0: its score would be float64's rounding noise
    h[R], k[R] = hr, kr


def values(case: GateCase) -> dict[str, torch.Tensor | None]:
    """The input values, rounded to their dtypes, contiguous on the CPU; and the upstream gradients."""
    gen = torch.Generator().manual_seed(case.seed)
    N, G, D, lead = case.N, case.G, case.D, case.lead
    vals: dict[str, torch.Tensor | None] = {}
    for name in ("w_q", "w_k"):
        wdtype = _weight_dtype(case, getattr(case, name))
        vals[name] = None if wdtype is None else (1 + 0.5 * _randn(gen, G, D)).to(wdtype)
    h, k, v = _randn(gen, N * G, D), _randn(gen, N * G, D), _randn(gen, N, D)
    for t, name, mag in zip((h, k, v), ("h", "k", "v"), case.magnitude, strict=True):
        if case.mixed_rows:
            lo, hi = magnitude_range(case.dtype, name, case.eps)
            t *= 10.0 ** (lo + (hi - lo) * _rand(gen, t.shape[0], 1))
        else:
            t *= 10.0**mag
        t[_rand(gen, t.shape[0]) < case.zero_rows] = 0.0
    w = torch.ones(G, D, dtype=torch.float64)
    for name in ("w_q", "w_k"):
        if vals[name] is not None:
            w = w * vals[name].double()
    _craft_scores(case, h, k, w.repeat(N, 1), gen)
    vals["h"], vals["k"], vals["v"] = h.view(*lead, G, D), k.view(*lead, G, D), v.view(*lead, D)
    if case.bad is not None:
        name, value, whole_row = case.bad
        n = int(torch.randint(0, N, (1,), generator=gen))
        row = vals[name].view(N, -1, D)[n, int(torch.randint(0, G, (1,), generator=gen)) if name != "v" else 0]
        if whole_row:
            row.fill_(value)
        else:
            row[int(torch.randint(0, D, (1,), generator=gen))] = value
    for name in ("h", "k", "v"):
        vals[name] = vals[name].to(case.dtype)
    vals["mask"] = _rand(gen, *lead) > 0.3 if case.mask else None
    vals["grad_o"] = _randn(gen, *lead, G, D).to(case.dtype)
    vals["grad_a"] = _randn(gen, *lead, G).to(compute_dtype(case.dtype))
    return vals


def _lay_out(data: torch.Tensor, layout: str, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage leaf, the view handed to the gate) holding ``data`` in the given layout.

    transposed: stored with the dims reversed; branch_major: stored with the second-to-last dim first
    (h and k as [G, *lead, D], a projection's output per branch); strided: every 2nd or 3rd element of the last dim;
    offset: a view at an odd storage offset (misaligned for vector loads); sliced: a corner of a larger
    tensor; expanded: stride 0 along the first dim (its rows all equal the first; the values change).
    """
    shape, dt = data.shape, data.dtype

    def leaf_on_device(t: torch.Tensor) -> torch.Tensor:  # requires grad before any view is taken of it
        return t.to(device).requires_grad_(data.is_floating_point())

    if layout == "transposed" and data.dim() >= 2:
        order = list(reversed(range(data.dim())))
        leaf = leaf_on_device(data.permute(order).contiguous())
        return leaf, leaf.permute(order)
    if layout == "branch_major" and data.dim() >= 2:
        leaf = leaf_on_device(data.movedim(-2, 0).contiguous())
        return leaf, leaf.movedim(0, -2)
    if layout == "strided":
        step = 2 + int(torch.randint(0, 2, (1,), generator=gen))
        leaf = torch.zeros(*shape[:-1], shape[-1] * step, dtype=dt)
        leaf[..., ::step] = data
        leaf = leaf_on_device(leaf)
        return leaf, leaf[..., ::step]
    if layout == "offset":
        offset = 1 + 2 * int(torch.randint(0, 4, (1,), generator=gen))
        leaf = torch.zeros(data.numel() + offset + 3, dtype=dt)
        leaf[offset : offset + data.numel()] = data.flatten()
        leaf = leaf_on_device(leaf)
        return leaf, leaf[offset : offset + data.numel()].view(shape)
    if layout == "sliced":
        leaf = torch.zeros(*(s + 1 for s in shape), dtype=dt)
        corner = tuple(slice(1, None) for _ in shape)
        leaf[corner] = data
        leaf = leaf_on_device(leaf)
        return leaf, leaf[corner]
    if layout == "expanded" and shape[0] > 0:
        leaf = leaf_on_device(data[:1].clone())
        return leaf, leaf.expand(shape)
    leaf = leaf_on_device(data.clone())
    return leaf, leaf


def inputs(case: GateCase, vals: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The views handed to the gate, on the device; their storage leaves require grad."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    views: dict[str, torch.Tensor | None] = {}
    for name in TENSORS:
        views[name] = None if vals[name] is None else _lay_out(vals[name], case.layout(name), case.device, gen)[1]
    if case.fused_kv:
        kv = torch.cat([vals["v"], vals["k"].flatten(-2)], dim=-1).to(case.device).requires_grad_(True)
        views["v"], views["k"] = kv[..., : case.D], kv[..., case.D :].unflatten(-1, (case.G, case.D))
    return views


# --------------------------------------------------------------------------------------------------
# Running the library and the references, and comparing.


def run(
    case: GateCase,
    fn: Callable,
    views: dict[str, torch.Tensor | None],
    grad_o: torch.Tensor,
    grad_a: torch.Tensor,
    eps: float | None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """o, a and the gradients of <o, grad_o> + <a, grad_a> (the outputs case.uses) w.r.t. h, k, v, w_q, w_k."""
    names = [n for n in GRAD_NAMES if views[n] is not None]
    o, a = fn(
        *(views[n] for n in GRAD_NAMES),
        mask=views["mask"],
        eps=eps,
        scale=case.scale,
        signed_sqrt=case.signed_sqrt,
        sqrt_clamp=case.sqrt_clamp,
        residual=case.residual,
        **kwargs,
    )
    outs, grads_out = [], []
    if case.uses in ("both", "o"):
        outs.append(o)
        grads_out.append(grad_o.to(o.dtype))
    if case.uses in ("both", "a"):
        outs.append(a)
        grads_out.append(grad_a.to(a.dtype))
    grads = torch.autograd.grad(outs, [views[n] for n in names], grads_out, allow_unused=True)
    result = {"o": o.detach(), "a": a.detach()}
    for n, g in zip(names, grads, strict=True):
        result[n] = torch.zeros_like(views[n]) if g is None else g
    return result


def run_gate(
    case: GateCase,
    views: dict[str, torch.Tensor | None],
    vals: dict[str, torch.Tensor | None],
    impl: Callable = retrieval_attention.gate,
) -> dict[str, torch.Tensor]:
    """``run`` of the library's gate (or ``impl``) with the case's upstream gradients and options."""
    device = views["h"].device
    return run(case, impl, views, vals["grad_o"].to(device), vals["grad_a"].to(device), case.eps)


def reference(
    case: GateCase,
    views: dict[str, torch.Tensor | None],
    vals: dict[str, torch.Tensor | None],
    truth: bool,
    perm: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The reference on contiguous copies of what the gate saw: in float64 (``truth``) or in the inputs' own
    precision (float32 arithmetic for the half types). ``perm`` permutes D, so the sums over D run in
    another order; the results are permuted back."""

    def prepare(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach().clone()
        if truth:
            t = t.double()
        if perm is not None:
            t = t[..., perm]
        return t.contiguous().requires_grad_(True)

    prepared = {n: prepare(views[n]) for n in GRAD_NAMES}
    prepared["mask"] = views["mask"]
    grad_o = vals["grad_o"].to(views["h"].device)
    grad_o = grad_o.double() if truth else grad_o
    grad_o = grad_o if perm is None else grad_o[..., perm]
    out = run(
        case,
        ref.gate,
        prepared,
        grad_o,
        vals["grad_a"].to(views["h"].device),
        case.resolved_eps,
        compute_dtype=torch.float64 if truth else None,
    )
    if perm is not None:
        inverse = torch.argsort(perm)
        out = {n: t if n == "a" else t[..., inverse] for n, t in out.items()}
    return out


def _event(what: str) -> None:
    """Counts ``what`` in hypothesis's statistics, inside a property test; nothing elsewhere."""
    if currently_in_test_context():
        event(what)


def _tokens(t: torch.Tensor, case: GateCase) -> torch.Tensor:
    """A per-token tensor [*lead, ...] as [N, -1]."""
    rest = t.shape[len(case.lead) :]
    return t.reshape(case.N, math.prod(rest))


def _cancelling_terms(case: GateCase, views: dict[str, torch.Tensor | None], vals: dict) -> dict[str, torch.Tensor]:
    """|first term| + |second term| of dh and dk in the gate's backward (docs/gate.md), per element, in float64:

        dh = r_q * (ds * scale * kn * w_q - x_q * ds * s / D)      (dk alike)

    The terms cancel where kn is parallel to x_q: always on a D = 1 row, where x_q = +-1 (up to eps)
    and the exact dh is ~0 while each term is ~r_q |ds|, large on a tiny row (r_q = 1/|h|). Any precision
    gets such a dh only to eps * (that size), so the size of the terms is the scale floor of dh and dk
    (the helper's ``scale_floor``, for outputs that cancel to nearly zero); on other rows the terms are
    about |dh| and the floor changes little. ds is taken without the clamp's cut (the slope at
    max(|s|, c)): whether |s| >= c is itself decided in finite precision, at |s| = c exactly (D = 1, c = 1).
    """
    D, eps, scale = case.D, case.resolved_eps, case.resolved_scale
    h, k, v = (views[n].detach().double() for n in ("h", "k", "v"))
    w_q, w_k = (1.0 if views[n] is None else views[n].detach().double() for n in ("w_q", "w_k"))
    r_q, r_k = (torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) for t in (h, k))
    x_q, x_k = h * r_q, k * r_k
    qn, kn = x_q * w_q, x_k * w_k
    s = scale * (qn * kn).sum(-1)
    u = s.abs().clamp_min(case.sqrt_clamp).sqrt() * s.sign() if case.signed_sqrt else s
    a = torch.sigmoid(u).requires_grad_(True)
    gated = a if views["mask"] is None else torch.where(views["mask"][..., None], a, torch.zeros_like(a))
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    if case.uses in ("both", "o"):
        loss = loss + (gated[..., None] * v[..., None, :] * vals["grad_o"].to(h.device).double()).sum()
    if case.uses in ("both", "a"):
        loss = loss + (gated * vals["grad_a"].to(h.device).double()).sum()
    (da,) = torch.autograd.grad(loss, a, allow_unused=True)
    du = torch.zeros_like(a) if da is None else da * a.detach() * (1 - a.detach())
    ds = du / (2 * s.abs().clamp_min(case.sqrt_clamp).sqrt()) if case.signed_sqrt else du
    ds, s = ds[..., None], s[..., None]
    return {
        "h": (r_q * ds * scale * kn * w_q).abs() + (r_q * x_q * ds * s / D).abs(),
        "k": (r_k * ds * scale * qn * w_k).abs() + (r_k * x_k * ds * s / D).abs(),
    }


def _check_fair(
    case: GateCase,
    name: str,
    ours: torch.Tensor,
    truth: torch.Tensor,
    sames: list[torch.Tensor],
    floor: float,
) -> None:
    """The fair bound of docs/accuracy.md, with the worst of the same-precision references (see compare).

    Elements the output dtype cannot hold (a float16 gradient past 65504) are left out of the bound,
    which an inf would make vacuous; there ours must overflow too, or be as large, with the truth's sign.
    Where a same-precision reference is not finite but the truth fits the dtype (float32's RMSNorm
    backward overflows r^3 on a row of norm below ~1e-13 with eps = 0), it gives no bound: the truth
    stands in for it, so the tolerance alone applies.
    """
    what = "o" if name == "o" else "a" if name == "a" else f"grad {name}"
    over = truth.double().abs() >= torch.finfo(ours.dtype).max
    if over.any():
        _event(f"{case.dtype} output overflows")
        big, t = ours[over].double(), truth[over].double()
        large = (big.abs() >= torch.finfo(ours.dtype).max / 2) & (torch.sign(big) == torch.sign(t))
        assert large.all(), f"{what}: where the truth overflows the output dtype, ours is {big[~large][:5].tolist()}"

        def drop(x: torch.Tensor) -> torch.Tensor:
            return torch.where(over, torch.zeros_like(x), x)

        ours, truth, sames = drop(ours), drop(truth), [drop(same) for same in sames]
    if any(not torch.isfinite(same).all() for same in sames):
        _event("same-precision reference not finite")
        sames = [torch.where(torch.isfinite(same), same, truth.to(same.dtype)) for same in sames]

    def err(t: torch.Tensor) -> float:
        return (t.double() - truth.double()).abs().max().item() if t.numel() else 0.0

    worst = max(sames, key=err)
    assert_close_to_truth(ours, truth, worst, case.dtype, what, scale_floor=floor)


def compare(
    case: GateCase,
    ours: dict[str, torch.Tensor],
    truth: dict[str, torch.Tensor],
    views: dict[str, torch.Tensor | None],
    vals: dict[str, torch.Tensor | None],
) -> None:
    """``ours`` (from ``run``) against the float64 ``truth``: NaN containment, then the fair bound on each output."""
    N = case.N
    # Tokens a NaN or inf touches: a non-finite input, or a non-finite truth (eps = 0 on a zero row is 0/0).
    bad = torch.zeros(N, dtype=torch.bool, device=case.device)
    for name in ("h", "k", "v"):
        bad |= ~torch.isfinite(_tokens(views[name].detach(), case)).all(-1)
    for name in TOKEN_OUTPUTS:
        bad |= ~torch.isfinite(_tokens(truth[name], case)).all(-1)
    good = ~bad
    if bad.any():
        _event("rows with NaN or inf")
    same = reference(case, views, vals, truth=False)

    # Containment: a non-finite value of ours lies in a bad token's rows (its o, a, dh, dk, and its
    # token's dv), or where the output dtype overflows: the truth is past its largest value (float16's
    # 65504; a truth of 65519.8 rounds to 65504, and a float32 result a few ulps above it to inf), or the
    # same-precision reference overflows too.
    for name in TOKEN_OUTPUTS:
        t = _tokens(truth[name], case)
        stray = ~torch.isfinite(_tokens(ours[name], case)) & good[:, None] & torch.isfinite(_tokens(same[name], case))
        stray &= t.abs() < torch.finfo(ours[name].dtype).max
        assert not stray.any(), (
            f"{name}: non-finite values outside the rows a NaN/inf touches, at tokens "
            f"{torch.nonzero(stray.any(-1)).flatten().tolist()[:10]} (bad tokens: "
            f"{torch.nonzero(bad).flatten().tolist()[:10]})"
        )
    # The gate is NaN exactly where the truth's is: nothing is hidden (a masked row's gate is 0).
    assert torch.equal(torch.isfinite(ours["a"]), torch.isfinite(truth["a"])), "a: NaN pattern differs from the truth"

    # Values. The fair bound takes the error of the same reference in the inputs' own precision; that
    # error depends on the order of the sums over D, and on a row whose score is near zero (slope
    # 1/(2 sqrt|s|)) or near the clamp, one order can happen to be much more exact than another, so a
    # single order is a coin toss: ~30% of such rows in float32 exceed twice its error, 0.4% twice the
    # worst of 17 orders, 0.05% of 33, none of 2000 rows for 65. So where the natural order does not
    # bound the error, the bound is retried with the worst of EXTRA_ORDERS more orders (D permuted): all
    # are the same reference in the same precision. On well-conditioned rows every order errs by a few
    # ulps and the tolerance term dominates, so this does not loosen the check there. For float64 inputs
    # the natural order is the truth's own computation (error 0): only other orders show float64's noise.
    terms = _cancelling_terms(case, views, vals)

    def check_all(sames: list[dict[str, torch.Tensor]]) -> None:
        for name in TOKEN_OUTPUTS:
            floor = 0.0
            if name in terms:  # dh, dk cancel to ~0 on D = 1 rows: floored at the size of their terms
                t = _tokens(terms[name], case)[good]
                floor = t.max().item() if t.numel() else 0.0
            _check_fair(
                case,
                name,
                _tokens(ours[name], case)[good],
                _tokens(truth[name], case)[good],
                [_tokens(s[name], case)[good] for s in sames],
                floor,
            )
        # dw_q, dw_k are sums over N: a bad token makes them NaN (expected), so they are compared only without one.
        for name in WEIGHT_GRADS:
            if name in ours:
                assert ours[name].dtype == views[name].dtype and ours[name].shape == views[name].shape
                if not bad.any():
                    _check_fair(case, name, ours[name], truth[name], [s[name] for s in sames], 0.0)

    try:
        check_all([same])
    except AssertionError:
        _event(f"fair bound: worst of {1 + EXTRA_ORDERS} summation orders")

        def err(name: str, t: torch.Tensor) -> float:
            diff = t.double() - truth[name].double()
            diff = _tokens(diff, case)[good] if name in TOKEN_OUTPUTS else diff
            return diff.abs().nan_to_num(nan=math.inf).max().item() if diff.numel() else 0.0

        gen = torch.Generator().manual_seed(case.seed + 2)
        worst = dict(same)  # per output, the order with the largest error; kept one at a time for memory
        worst_err = {name: err(name, t) for name, t in worst.items()}
        for _ in range(EXTRA_ORDERS):
            perm = torch.randperm(case.D, generator=gen).to(case.device)
            other = reference(case, views, vals, truth=False, perm=perm)
            for name, t in other.items():
                e = err(name, t)
                if e > worst_err[name]:
                    worst[name], worst_err[name] = t, e
        check_all([same, worst])


def check(case: GateCase, impl: Callable = retrieval_attention.gate) -> None:
    """Runs ``impl`` (the library's gate) on the case's inputs and compares everything with the reference."""
    vals = values(case)
    views = inputs(case, vals)
    ours = run_gate(case, views, vals, impl)
    truth = reference(case, views, vals, truth=True)

    assert ours["o"].dtype == case.dtype and ours["o"].shape == (*case.lead, case.G, case.D)
    assert ours["a"].dtype == compute_dtype(case.dtype) and ours["a"].shape == (*case.lead, case.G)
    for name in GRAD_NAMES:
        if views[name] is not None:
            assert ours[name].dtype == views[name].dtype, f"grad {name}: {ours[name].dtype}"
            assert ours[name].shape == views[name].shape, f"grad {name}: {tuple(ours[name].shape)}"
    compare(case, ours, truth, views, vals)
