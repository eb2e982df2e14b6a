"""pytest plugin for `make test-asan`: the tests must import the sanitized build, not the in-place one.

pyproject.toml puts torch_ext/ first on sys.path; `make test-asan` overrides that with the copy in
RA_ASAN_LIB (build/asan/lib). This plugin fails the run before any test if the override did not take,
and names the library the tests use in pytest's header.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _library() -> Path:
    import retrieval_attention._C

    return Path(retrieval_attention._C.__file__).resolve()


def pytest_configure(config: pytest.Config) -> None:
    expected = Path(os.environ["RA_ASAN_LIB"]).resolve()
    library = _library()
    if expected not in library.parents:
        raise pytest.UsageError(f"test-asan: the tests import {library}, not the sanitized build under {expected}")
    with open("/proc/self/maps") as maps:
        if "libasan" not in maps.read():
            raise pytest.UsageError("test-asan: the AddressSanitizer runtime is not loaded (LD_PRELOAD)")


def pytest_report_header(config: pytest.Config) -> str:
    return f"retrieval_attention._C (sanitized): {_library()}"
