"""A TorchInductor cache folder per CPU capability and per build of this library.

Inductor's caches tell neither ``ATEN_CPU_CAPABILITY`` values nor builds of this library apart: a
kernel generated for one vector width computes wrong values under another (or indexes out of
bounds, or crashes), and a cached backward calls ``gate_backward`` with the argument order of the
build it was compiled against. The tests and the benchmarks therefore compile into a folder of
their own for each capability and build.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path


def isolate_inductor_cache() -> str:
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at this capability's and this build's folder (under the current
    one, or inductor's default); returns it. Call before anything is compiled."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() or "native"
    libraries = sorted(Path(__file__).parent.glob("*.so"))
    build = zlib.crc32(" ".join(f"{lib}:{lib.stat().st_mtime_ns}" for lib in libraries).encode())
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    folder = os.path.join(root, f"capability_{capability}-build_{build:08x}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder
