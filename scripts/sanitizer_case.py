"""A small forward and backward of every kernel variant, for compute-sanitizer (scripts/gpu_check.sh)."""

from __future__ import annotations

import torch

import retrieval_attention


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for N, G, D in ((5, 3, 64), (4, 2, 67), (0, 2, 8)):  # the 16-byte path, the scalar path, no rows
            for weights, residual, mask in ((True, False, False), (False, True, True)):
                h, k = (torch.randn(N, G, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
                v = torch.randn(N, D, device="cuda", dtype=dtype, requires_grad=True)
                w = [torch.rand(G, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)]
                w = w if weights else [None, None]
                keep = torch.arange(N, device="cuda") % 2 == 0 if mask else None
                o, a = retrieval_attention.gate(h, k, v, *w, residual=residual, mask=keep)
                (o.float().square().sum() + a.sum()).backward()
    torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main()
