"""The operator inside PyTorch's machinery: gradcheck, opcheck, torch.compile, modules."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import retrieval_attention
from retrieval_attention import reference

from conftest import DEVICES
from tolerances import FINITE_DIFFERENCE_STEP, assert_agree, tolerance

CONFIGS = {
    "weights": {"weights": True},
    "no_weights": {"weights": False},
    "residual_mask": {"weights": True, "residual": True, "mask": True},
    "plain_sigmoid": {"weights": True, "signed_sqrt": False},
}


def _inputs(config: dict, N: int, G: int, D: int, dtype: torch.dtype, device: str, requires_grad: bool = True):
    def leaf(*shape: int, base: float = 0.0) -> torch.Tensor:
        return (base + torch.randn(*shape, dtype=dtype, device=device)).requires_grad_(requires_grad)

    args = [leaf(N, G, D), leaf(N, G, D), leaf(N, D)]
    args += [leaf(G, D, base=1.0), leaf(G, D, base=1.0)] if config.get("weights") else [None, None]
    kwargs = {"residual": config.get("residual", False), "signed_sqrt": config.get("signed_sqrt", True)}
    if config.get("mask"):
        kwargs["mask"] = torch.arange(N, device=device) % 3 != 1
    return args, kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradcheck_float64(device: str, config: str) -> None:
    args, kwargs = _inputs(CONFIGS[config], 5, 2, 7, torch.float64, device)
    # Both outputs carry gradient, so the check covers grad_o and grad_a.
    assert torch.autograd.gradcheck(
        lambda *a: retrieval_attention.gate(*a, **kwargs),
        args,
        eps=FINITE_DIFFERENCE_STEP,
        atol=tolerance(torch.float64, "finite_differences"),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_opcheck_gate(device: str, config: str) -> None:
    args, kwargs = _inputs(CONFIGS[config], 6, 3, 20, torch.float32, device)
    torch.library.opcheck(torch.ops.retrieval_attention.gate.default, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gate_inference(device: str) -> None:
    args, kwargs = _inputs(CONFIGS["residual_mask"], 6, 3, 20, torch.float32, device, requires_grad=False)
    torch.library.opcheck(torch.ops.retrieval_attention.gate.default, args, {**kwargs, "save_stats": False})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_opcheck_gate_backward(device: str, config: str) -> None:
    args, kwargs = _inputs(CONFIGS[config], 6, 3, 20, torch.float32, device, requires_grad=False)
    o, a, stats = torch.ops.retrieval_attention.gate(*args, **kwargs)
    inputs = dict(zip(("h", "k", "v", "w_q", "w_k"), args, strict=True))
    # Every argument by keyword: the backward takes the forward's inputs and options (docs/gate.md).
    backward_kwargs = {"grad_o": torch.randn_like(o), "grad_a": torch.randn_like(a), "a": a, "stats": stats}
    backward_kwargs |= {**inputs, "mask": None, "scale": None, "sqrt_clamp": 1e-6, **kwargs}
    torch.library.opcheck(torch.ops.retrieval_attention.gate_backward.default, (), backward_kwargs)


def _gate_and_loss(h, k, v, w_q, w_k, mask):
    o, a = retrieval_attention.gate(h, k, v, w_q, w_k, mask=mask, residual=True)
    return (o.float() ** 2).sum() + a.sum(), o, a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_dynamic_without_recompiles(device: str, dtype: torch.dtype) -> None:
    """Compiled and eager agree on what the gate returns, o, a and the gradients, each in its dtype.

    The float32 loss itself is not compared: inductor may sum it in another order.
    """
    torch._dynamo.reset()
    compiled = torch.compile(_gate_and_loss, fullgraph=True, dynamic=True)
    G = 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        for N, D in ((48, 32), (61, 32), (77, 48), (93, 100)):
            config = {"weights": True}
            args, _ = _inputs(config, N, G, D, dtype, device)
            mask = torch.rand(N, device=device) > 0.2
            eager_args = [t.detach().clone().requires_grad_(True) for t in args]
            loss, o, a = compiled(*args, mask)
            grads = torch.autograd.grad(loss, args)
            eager_loss, eager_o, eager_a = _gate_and_loss(*eager_args, mask)
            eager_grads = torch.autograd.grad(eager_loss, eager_args)
            assert_agree(o, eager_o, "o", dtype)
            assert_agree(a, eager_a, "a", dtype)
            for name, g, e in zip(("h", "k", "v", "w_q", "w_k"), grads, eager_grads, strict=True):
                assert_agree(g, e, f"grad {name}", dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_functional_and_trains(device: str) -> None:
    G, D = 2, 24
    module = retrieval_attention.RetrievalGate(D, G, residual=True).to(device)
    with torch.no_grad():
        module.w_q.mul_(torch.rand_like(module.w_q) + 0.5)
    h, k = torch.randn(3, 5, G, D, device=device), torch.randn(3, 5, G, D, device=device)
    v = torch.randn(3, 5, D, device=device)
    o, a = module(h, k, v)
    ref_o, ref_a = reference.gate(h, k, v, module.w_q, module.w_k, residual=True)
    assert_agree(o, ref_o, "o")
    assert_agree(a, ref_a, "a")
    (o.sum() + a.sum()).backward()
    assert module.w_q.grad is not None and module.w_k.grad is not None
    assert set(module.state_dict()) == {"w_q", "w_k"}
    plain = retrieval_attention.RetrievalGate(D, G, elementwise_affine=False)
    assert list(plain.parameters()) == []
    assert_agree(plain(h.cpu(), k.cpu(), v.cpu())[0], reference.gate(h.cpu(), k.cpu(), v.cpu())[0], "o")


def test_module_compiles() -> None:
    module = retrieval_attention.RetrievalGate(16, 2)
    compiled = torch.compile(module, fullgraph=True)
    h, k, v = torch.randn(7, 2, 16), torch.randn(7, 2, 16), torch.randn(7, 16)
    for name, got, expected in zip(("o", "a"), compiled(h, k, v), module(h, k, v), strict=True):
        assert_agree(got, expected, name)
