"""Devices, dtypes, per-test seeds, the hypothesis profiles and the per-dtype error summary."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

import retrieval_attention
from retrieval_attention import NgramHashEmbedding, RetrievalAttention
from retrieval_attention._inductor_cache import isolate_inductor_cache

from tolerances import WORST

isolate_inductor_cache()  # before anything compiles: see retrieval_attention/_inductor_cache.py

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
DEVICE_NAMES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]  # where tests run: for hypothesis to draw from
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]  # for parametrize: the CUDA ones skip without a GPU
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# The property tests' profiles, chosen by RA_FUZZ_PROFILE: "ci" (default) is bounded and derandomized,
# "long" draws at least 10,000 fresh examples per property (`make fuzz-long`).
_PROFILE_COMMON = {
    "deadline": None,
    "database": None,  # nothing written into the working tree; a failure prints its reproduce blob
    "print_blob": True,
    # The autouse seed fixture is function-scoped: harmless, as every example seeds its own generator.
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
}
settings.register_profile("ci", max_examples=150, derandomize=True, **_PROFILE_COMMON)
settings.register_profile("long", max_examples=10_000, **_PROFILE_COMMON)
FUZZ_SETTINGS = settings.get_profile(os.environ.get("RA_FUZZ_PROFILE", "ci"))  # applied per test


def seed_of(node_id: str) -> int:
    """A test's seed: fixed by its node id, so a result does not depend on which tests ran before."""
    return zlib.crc32(node_id.encode())


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch's generators (CPU and CUDA) for this test and returns the seed."""
    value = seed_of(request.node.nodeid)
    torch.manual_seed(value)
    return value


@pytest.fixture
def small_modules() -> dict[str, torch.nn.Module]:
    """An n-gram embedding (80 token ids) and two blocks of D = 16 on its output, every parameter perturbed."""
    torch.manual_seed(1)
    modules = {
        "embedding": NgramHashEmbedding.from_seed(
            [61, 53], 2, 8, token_vocab_size=50, lookup=torch.randint(0, 50, (80,))
        ),
        "attention_conv": RetrievalAttention(16, 16, 2, short_conv=True),
        "attention_plain": RetrievalAttention(16, 16, 1, short_conv=False),
    }
    with torch.no_grad():
        for module in modules.values():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return modules


def pytest_report_header(config: pytest.Config) -> str:
    return f"retrieval_attention: cpu capability {retrieval_attention.build_info()['cpu_capability']}"


def pytest_terminal_summary(terminalreporter) -> None:
    if WORST:
        terminalreporter.section("worst error against the float64 reference, as a fraction of scale")
        for dtype, err in sorted(WORST.items(), key=lambda kv: str(kv[0])):
            terminalreporter.write_line(f"{dtype!s:>16}: {err:.3e}")
