"""Retrieval attention with a sigmoid gate (DeepSeek's Engram), as fused PyTorch operators.

``gate`` is the functional form, ``RetrievalGate`` the module, ``reference`` the plain
PyTorch reference the tests and benchmarks compare against, and ``build_info()`` says
what the compiled library holds.
"""

from __future__ import annotations

import torch

from ._version import __version__

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "retrieval_attention: the compiled extension retrieval_attention._C, or the libretrieval_attention it "
        f"links beside it, is not built or does not load ({error}). Build them with `make build` in the repository "
        "(or `pip install --no-build-isolation .`); they must be built against the torch that is imported, here torch "
        f"{torch.__version__}."
    ) from error

from . import _ops, reference  # noqa: F401  (_ops registers the fake kernels)
from .fp8 import Fp8NgramHashEmbedding, dequantize_rows_fp8, fp8_lookup, quantize_rows_fp8
from .functional import decode_step, gate, ngram_hash, short_conv
from .modules import RetrievalAttention, RetrievalGate, ShortConv
from .ngram import NgramHashEmbedding, ngram_hash_tables


def build_info() -> dict[str, object]:
    """What the compiled library holds.

    Keys: ``version``, ``torch_version`` (the headers it was built against),
    ``cpu_capabilities`` (SIMD variants compiled in), ``cpu_capability`` (the one this
    process runs; set ``ATEN_CPU_CAPABILITY`` to lower it), ``cuda`` (kernels compiled
    in), ``cuda_version`` and ``cuda_archs``.
    """
    return dict(_C.build_info())


__all__ = [
    "Fp8NgramHashEmbedding",
    "NgramHashEmbedding",
    "RetrievalAttention",
    "RetrievalGate",
    "ShortConv",
    "__version__",
    "build_info",
    "decode_step",
    "dequantize_rows_fp8",
    "fp8_lookup",
    "gate",
    "ngram_hash",
    "ngram_hash_tables",
    "quantize_rows_fp8",
    "reference",
    "short_conv",
]
