"""Bad input, each case in a child process, so a crash (a signal, an abort, a hang) fails that case, not the run.

A ``BadCase`` builds a call that must raise an error naming the argument (and saying what was expected
and what was given). ``check_in_child`` runs it in a child process forked from the test process (spawned
for a CUDA case, as CUDA does not survive a fork); the child reports the exception's type and message back
through a pipe, and whether the failing call left every tensor argument untouched (version counter and bytes).
A test file keeps its cases in a module-level ``CASES`` dict, which the child looks up by module and name.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import re
import signal
from collections.abc import Callable

import pytest
import torch

from conftest import NEEDS_CUDA

FORK_TIMEOUT_S = 60.0
SPAWN_TIMEOUT_S = 180.0  # a spawned child imports torch and initializes CUDA first


@dataclasses.dataclass(frozen=True)
class BadCase:
    """``build()`` returns ``(call, args, kwargs)``; the call must raise ``error`` matching ``pattern``."""

    build: Callable[[], tuple[Callable, tuple, dict]]
    error: type[BaseException] | tuple[type[BaseException], ...]
    pattern: str
    expected_got: bool = True  # the message says what was expected and what was given
    cuda: bool = False


def named(
    table: dict[str, tuple],
    call: Callable[..., Callable[[], tuple[Callable, tuple, dict]]],
    prefix: str,
    **call_kwargs,
) -> dict[str, BadCase]:
    """BadCases from a table of ``name: (*arguments of call, argument name, error)``."""
    return {
        f"{prefix}-{name}": BadCase(call(*row[:-2], **call_kwargs), row[-1], re.escape(row[-2]))
        for name, row in table.items()
    }


def parametrize(cases: dict[str, BadCase]) -> pytest.MarkDecorator:
    """Parametrizes a test over the case names; the CUDA ones skip without a GPU."""
    return pytest.mark.parametrize(
        "name", [pytest.param(name, marks=NEEDS_CUDA) if case.cuda else name for name, case in cases.items()]
    )


def _fingerprint(value: object) -> list:
    """Version counter and bytes of every tensor in ``value`` (a tensor, a module or a container)."""
    if isinstance(value, torch.Tensor):
        return [(value._version, value.detach().cpu().clone())]
    if isinstance(value, torch.nn.Module):
        return [item for t in (*value.parameters(), *value.buffers()) for item in _fingerprint(t)]
    if isinstance(value, (tuple, list)):
        return [item for v in value for item in _fingerprint(v)]
    if isinstance(value, dict):
        return [item for v in value.values() for item in _fingerprint(v)]
    return []


def _same(before: list, after: list) -> bool:
    if len(before) != len(after):
        return False
    for (v0, t0), (v1, t1) in zip(before, after, strict=True):
        if v0 != v1 or t0.dtype != t1.dtype or t0.shape != t1.shape:
            return False
        if not torch.equal(t0.contiguous().view(-1).view(torch.uint8), t1.contiguous().view(-1).view(torch.uint8)):
            return False
    return True


def _attempt(case: BadCase) -> dict:
    """Runs in the child: builds the case, calls it, and describes what happened."""
    call, args, kwargs = case.build()
    everything = (call, args, kwargs)
    before = _fingerprint(everything)
    report: dict = {"raised": None}
    try:
        call(*args, **kwargs)
    except Exception as error:
        report = {"raised": [c.__name__ for c in type(error).__mro__], "message": str(error)}
    report["unchanged"] = _same(before, _fingerprint(everything))
    return report


def _child_main(module: str, name: str, writer) -> None:
    torch.set_num_threads(1)  # no OpenMP team in a forked child
    try:
        report = _attempt(importlib.import_module(module).CASES[name])
    except BaseException as error:
        report = {"harness_error": f"{type(error).__name__}: {error}"}
    writer.send(report)
    writer.close()


def _run_isolated(module: str, name: str, method: str, timeout: float) -> tuple[dict | None, str]:
    """Runs case ``name`` of ``module`` in a child; returns its report (None if it sent none) and how it ended."""
    context = multiprocessing.get_context(method)
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(module, name, writer), daemon=True)
    process.start()
    writer.close()
    report, hung = None, False
    try:
        if reader.poll(timeout):  # a report, or end of file when the child died without one
            report = reader.recv()
        else:
            hung = True
    except EOFError:
        report = None
    finally:
        reader.close()
    if hung:
        process.kill()
    process.join(timeout)
    if hung or process.is_alive():
        process.kill()
        process.join()
        return report, f"hung (killed after {timeout:g} s)"
    code = process.exitcode
    if code is not None and code < 0:
        return report, f"killed by signal {signal.Signals(-code).name}"
    return report, f"exit code {code}"


def check_in_child(module: str, name: str) -> None:
    """Case ``name`` of ``module``'s CASES, run in a child, raised the error it should and changed nothing."""
    case = importlib.import_module(module).CASES[name]
    if case.cuda:
        report, ending = _run_isolated(module, name, "spawn", SPAWN_TIMEOUT_S)
    else:
        report, ending = _run_isolated(module, name, "fork", FORK_TIMEOUT_S)
    assert report is not None, f"{name}: the child sent no report ({ending}): a crash, not an error"
    assert "harness_error" not in report, f"{name}: the case could not run: {report['harness_error']}"
    assert ending == "exit code 0", f"{name}: the child reported but then ended badly ({ending})"
    errors = case.error if isinstance(case.error, tuple) else (case.error,)
    assert report["raised"] is not None, f"{name}: no error raised; expected {[e.__name__ for e in errors]}"
    assert any(e.__name__ in report["raised"] for e in errors), (
        f"{name}: raised {report['raised'][0]} ({report['message']!r}), expected {[e.__name__ for e in errors]}"
    )
    message = report["message"]
    assert re.search(case.pattern, message), f"{name}: message {message!r} does not match {case.pattern!r}"
    if case.expected_got:
        assert "expected" in message and "got" in message, f"{name}: {message!r}"
    assert report["unchanged"], f"{name}: the failing call modified an argument (bytes or version counter)"
