"""Registers, spills and shared memory per CUDA kernel, from a build log with ptxas's -v output.

    python scripts/ptxas_table.py LOG      a Markdown table on stdout (scripts/gpu_check.sh)

The build prints them where CMake's RA_PTXAS_VERBOSE is on. Names are demangled with c++filt
where there is one and shortened to the kernel and its template arguments.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")
USAGE = re.compile(r"ptxas info\s*: Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
# Prefixes that every kernel of the library shares: they only lengthen the table.
NOISE = re.compile(r"^void |retrieval_attention::|cuda::|\(anonymous namespace\)::|c10::")


@dataclass
class Kernel:
    name: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


def parse(lines: list[str]) -> list[Kernel]:
    """The entry functions in the order ptxas compiled them; the lines after each belong to it.

    A stack/spill line belongs to the function named by the "Function properties for" line above
    it: an out-of-line device function's properties come among its caller's and are not the kernel's.
    """
    kernels: list[Kernel] = []
    properties_of = None
    for line in lines:
        if entry := ENTRY.search(line):
            kernels.append(Kernel(entry.group(1), entry.group(2)))
            properties_of = None
        elif not kernels:
            continue
        elif props := PROPERTIES.search(line):
            properties_of = props.group(1)
        elif frame := FRAME.search(line):
            k = kernels[-1]
            if properties_of in (None, k.name):
                k.stack, k.spill_stores, k.spill_loads = (int(x) for x in frame.groups())
        elif usage := USAGE.search(line):
            kernels[-1].registers = int(usage.group(1))
            smem = SMEM.search(line)
            kernels[-1].smem = int(smem.group(1)) if smem else 0
    return kernels


def demangle(names: list[str]) -> list[str]:
    """Readable names: c++filt's where it is installed, else the mangled ones."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
    readable = result.stdout.splitlines()
    return readable if result.returncode == 0 and len(readable) == len(names) else names


def short(name: str) -> str:
    """The kernel and its template arguments, without namespaces or the parameter list."""
    name = NOISE.sub("", name)
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i]
    return name


def table(kernels: list[Kernel]) -> str:
    if not kernels:
        return "No ptxas -v lines in the log (was the build run with -DRA_PTXAS_VERBOSE=ON?).\n"
    names = [short(n) for n in demangle([k.name for k in kernels])]
    spilling = [n for n, k in zip(names, kernels, strict=True) if k.spill_stores or k.spill_loads]
    most = max(range(len(kernels)), key=lambda i: kernels[i].registers)
    lines = [
        f"{len(kernels)} kernels; most registers: {kernels[most].registers} ({names[most]}); "
        f"spilling: {len(spilling)}" + (f" ({', '.join(spilling)})" if spilling else "") + ".",
        "",
        "| kernel | arch | registers | spill stores / loads (bytes) | stack (bytes) | static smem (bytes) |",
        "|---|---|---|---|---|---|",
    ]
    for name, k in sorted(zip(names, kernels, strict=True), key=lambda pair: pair[0]):
        lines.append(
            f"| `{name}` | {k.arch} | {k.registers} | {k.spill_stores} / {k.spill_loads} | {k.stack} | {k.smem} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    lines = Path(argv[1]).read_text(errors="replace").splitlines()
    print(table(parse(lines)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
