"""Bad input, each case in a child process (issue #6, item 6).

Every bad input of SPEC §2, and for ``ngram_hash`` negative ids, non-positive primes, mismatched
shapes and non-int64 dtypes, raises an error that names the argument (and says what was expected
and what was given). Each case runs in its own child process, forked from the test process, so a
crash (a signal, an abort, a hang) fails that case instead of killing the run; the child reports
the exception's type and message back through a pipe. The child also checks that the failing
call wrote nothing: every tensor argument keeps its version counter and its bytes.

The case tables of tests/test_gate_errors.py and tests/test_ngram_hash.py are reused, with more
cases here. CUDA cases (mixed devices) run in a spawned child, as CUDA does not survive a fork.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import signal
from collections.abc import Callable

import pytest
import torch

import retrieval_attention
from retrieval_attention import NgramHashEmbedding, RetrievalAttention, RetrievalGate

from conftest import HAS_CUDA
from test_gate_errors import BAD_INPUTS as GATE_TABLE
from test_gate_errors import _good as _good_gate
from test_ngram_hash import BAD_INPUTS as NGRAM_TABLE
from test_ngram_hash import _bad as _good_ngram

CHILD_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class BadCase:
    """``build()`` returns ``(call, args, kwargs)``; the call must raise ``error`` matching ``pattern``."""

    build: Callable[[], tuple[Callable, tuple, dict]]
    error: type[BaseException] | tuple[type[BaseException], ...]
    pattern: str
    expected_got: bool = True  # the message says what was expected and what was given
    cuda: bool = False


def _gate_call(tensors: dict, kwargs: dict, via: str = "functional") -> Callable[[], tuple[Callable, tuple, dict]]:
    def build() -> tuple[Callable, tuple, dict]:
        args = {**_good_gate(), **tensors}
        args = {name: t.clone() for name, t in args.items()}  # fresh tensors: version counters at 0
        positional = (args["h"], args["k"], args["v"], args["w_q"], args["w_k"])
        if via == "op":
            return torch.ops.retrieval_attention.gate, positional, dict(kwargs)
        return retrieval_attention.gate, positional, dict(kwargs)

    return build


def _ngram_call(args: dict, via: str = "functional") -> Callable[[], tuple[Callable, tuple, dict]]:
    def build() -> tuple[Callable, tuple, dict]:
        positional = tuple(args[name].clone() for name in ("ids", "multipliers", "primes"))
        fn = torch.ops.retrieval_attention.ngram_hash if via == "op" else retrieval_attention.ngram_hash
        return fn, positional, {"pad_id": args["pad_id"]}

    return build


CASES: dict[str, BadCase] = {}

# The tables of tests/test_gate_errors.py, through the functional API and the registered operator.
for _name, (_tensors, _kwargs, _arg, _error) in GATE_TABLE.items():
    CASES[f"gate-{_name}"] = BadCase(_gate_call(_tensors, _kwargs), _error, re.escape(_arg))
    CASES[f"gate_op-{_name}"] = BadCase(_gate_call(_tensors, _kwargs, via="op"), _error, re.escape(_arg))

_N, _G, _D = 4, 2, 8
_GATE_MORE = {
    "k_rank": ({"k": torch.randn(_N * _G, _D)}, {}, "`k`", ValueError),
    "v_rank": ({"v": torch.randn(_N, _G, _D)}, {}, "`v`", ValueError),
    "h_no_G": ({"h": torch.randn(_N, 0, _D), "k": torch.randn(_N, 0, _D)}, {}, "`h`", ValueError),
    "h_bool": ({"h": torch.ones(_N, _G, _D, dtype=torch.bool)}, {}, "`h`", TypeError),
    "k_integer": ({"k": torch.ones(_N, _G, _D, dtype=torch.int32)}, {}, "`k`", TypeError),
    "v_integer": ({"v": torch.ones(_N, _D, dtype=torch.int16)}, {}, "`v`", TypeError),
    "v_complex": ({"v": torch.randn(_N, _D, dtype=torch.complex64)}, {}, "`v`", TypeError),
    "w_k_integer": ({"w_k": torch.ones(_G, _D, dtype=torch.int64)}, {}, "`w_k`", TypeError),
    "w_q_complex": ({"w_q": torch.ones(_G, _D, dtype=torch.complex64)}, {}, "`w_q`", TypeError),
    "w_k_float64": ({"w_k": torch.ones(_G, _D, dtype=torch.float64)}, {}, "`w_k`", TypeError),
    "w_q_transposed": ({"w_q": torch.ones(_D, _G)}, {}, "`w_q`", ValueError),
    "mask_leading": ({}, {"mask": torch.ones(_N + 1, dtype=torch.bool)}, "`mask`", ValueError),
    "mask_float": ({}, {"mask": torch.ones(_N)}, "`mask`", TypeError),
    "eps_inf": ({}, {"eps": float("inf")}, "`eps`", ValueError),
    "scale_nan": ({}, {"scale": float("nan")}, "`scale`", ValueError),
    "clamp_nan": ({}, {"sqrt_clamp": float("nan")}, "`sqrt_clamp`", ValueError),
    "clamp_inf": ({}, {"sqrt_clamp": float("inf")}, "`sqrt_clamp`", ValueError),
    "leading_dims_differ": (
        {"h": torch.randn(2, 3, _G, _D), "k": torch.randn(3, 2, _G, _D), "v": torch.randn(2, 3, _D)},
        {},
        "`k`",
        ValueError,
    ),
}
for _name, (_tensors, _kwargs, _arg, _error) in _GATE_MORE.items():
    CASES[f"gate-{_name}"] = BadCase(_gate_call(_tensors, _kwargs), _error, re.escape(_arg))


def _module_gate_bad_k() -> tuple[Callable, tuple, dict]:
    module = RetrievalGate(_D, _G)
    return module, (torch.randn(_N, _G, _D), torch.randn(_N, _G, _D + 1), torch.randn(_N, _D)), {}


def _backward_case(change: str) -> Callable[[], tuple[Callable, tuple, dict]]:
    """gate_backward given a bad saved tensor or gradient."""

    def build() -> tuple[Callable, tuple, dict]:
        good = _good_gate()
        o, a, stats = torch.ops.retrieval_attention.gate(*good.values())
        grad_o, grad_a = torch.ones_like(o), None
        if change == "stats_shape":
            stats = stats[:2].clone()
        elif change == "a_dtype":
            a = a.double()
        elif change == "grad_o_shape":
            grad_o = torch.ones(_N, _G, _D + 1)
        elif change == "grad_a_shape":
            grad_a = torch.ones(_N)
        args = (grad_o, grad_a, *good.values(), None, a, stats)
        kwargs = {"scale": None, "signed_sqrt": True, "sqrt_clamp": 1e-6, "residual": False}
        return torch.ops.retrieval_attention.gate_backward, args, kwargs

    return build


CASES["gate_module-k_shape"] = BadCase(_module_gate_bad_k, ValueError, "`k`")
CASES["gate_backward-stats_shape"] = BadCase(_backward_case("stats_shape"), ValueError, "`stats`")
CASES["gate_backward-a_dtype"] = BadCase(_backward_case("a_dtype"), TypeError, "`a`")
CASES["gate_backward-grad_o_shape"] = BadCase(_backward_case("grad_o_shape"), ValueError, "`grad_o`")
CASES["gate_backward-grad_a_shape"] = BadCase(_backward_case("grad_a_shape"), ValueError, "`grad_a`")

# The table of tests/test_ngram_hash.py (negative ids, non-positive primes, shapes, dtypes, pad_id).
for _name, (_args, _arg, _error) in NGRAM_TABLE.items():
    CASES[f"ngram-{_name}"] = BadCase(_ngram_call(_args), _error, re.escape(_arg))
    CASES[f"ngram_op-{_name}"] = BadCase(_ngram_call(_args, via="op"), _error, re.escape(_arg))

_late_negative = torch.randint(0, 2**40, (4, 3000))
_late_negative[3, 2999] = -(2**62)
_NGRAM_MORE = {
    "ids_float": (_good_ngram(ids=torch.zeros(2, 5)), "`ids`", TypeError),
    "ids_uint8": (_good_ngram(ids=torch.zeros(2, 5, dtype=torch.uint8)), "`ids`", TypeError),
    "ids_rank3": (_good_ngram(ids=torch.zeros(2, 5, 1, dtype=torch.int64)), "`ids`", ValueError),
    "ids_negative_last_of_many_chunks": (_good_ngram(ids=_late_negative), r"`ids`.*-4611686018427387904", ValueError),
    "ids_negative_strided": (_good_ngram(ids=-torch.ones(6, 10, dtype=torch.int64)[::2, ::3]), "`ids`", ValueError),
    "multipliers_int32": (
        _good_ngram(multipliers=torch.tensor([3, 5, 7], dtype=torch.int32)),
        "`multipliers`",
        TypeError,
    ),
    "multipliers_too_many": (_good_ngram(multipliers=torch.tensor([3, 5, 7, 9])), "`primes`", ValueError),
    "primes_float": (_good_ngram(primes=torch.ones(2, 2)), "`primes`", TypeError),
    "primes_last_negative": (_good_ngram(primes=torch.tensor([[11, 13], [17, -(2**62)]])), "`primes`", ValueError),
    "primes_all_zero": (_good_ngram(primes=torch.zeros(2, 2, dtype=torch.int64)), "`primes`", ValueError),
    "pad_id_very_negative": (_good_ngram(pad_id=-(2**63)), "`pad_id`", ValueError),
}
for _name, (_args, _arg, _error) in _NGRAM_MORE.items():
    CASES[f"ngram-{_name}"] = BadCase(
        _ngram_call(_args), _error, _arg if _arg.startswith("`ids`.") else re.escape(_arg)
    )


def _embedding_negative_id() -> tuple[Callable, tuple, dict]:
    module = NgramHashEmbedding.from_seed([61, 53], 2, 8, token_vocab_size=50)
    return module, (torch.tensor([[3, 4, -1, 5]]),), {}


def _attention_bad(which: str) -> Callable[[], tuple[Callable, tuple, dict]]:
    def build() -> tuple[Callable, tuple, dict]:
        module = RetrievalAttention(8, 12, 2)
        hidden, retrieved = torch.randn(2, 5, 2, 8), torch.randn(2, 5, 12)
        if which == "hidden":
            hidden = torch.randn(2, 5, 3, 8)
        else:
            retrieved = torch.randn(2, 6, 12)
        return module, (hidden, retrieved), {}

    return build


CASES["embedding-negative_id"] = BadCase(_embedding_negative_id, ValueError, "`ids`")
CASES["attention-hidden_branches"] = BadCase(_attention_bad("hidden"), ValueError, "hidden", expected_got=False)
CASES["attention-retrieved_tokens"] = BadCase(_attention_bad("retrieved"), ValueError, "retrieved", expected_got=False)


def _cuda_mixed(which: str) -> Callable[[], tuple[Callable, tuple, dict]]:
    def build() -> tuple[Callable, tuple, dict]:
        if which.startswith("gate"):
            good = _good_gate()
            args = {name: t if name == which[5:] else t.cuda() for name, t in good.items()}
            return retrieval_attention.gate, tuple(args.values()), {}
        good = _good_ngram()
        name = which[6:]
        args = {n: t if n == name or not isinstance(t, torch.Tensor) else t.cuda() for n, t in good.items()}
        return retrieval_attention.ngram_hash, (args["ids"], args["multipliers"], args["primes"]), {"pad_id": 0}

    return build


for _which in ("gate-k", "gate-v", "gate-w_q", "ngram-multipliers", "ngram-primes"):
    _arg = _which.split("-")[1]
    CASES[f"cuda_devices-{_which}"] = BadCase(_cuda_mixed(_which), RuntimeError, f"`{_arg}`", cuda=True)


# ---------------------------------------------------------------------------------------------
# The child process and its report


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


def _attempt(name: str) -> dict:
    """Runs in the child: builds the case, calls it, and describes what happened."""
    if name == "harness-no_error":
        call, args, kwargs = retrieval_attention.gate, tuple(_good_gate().values()), {}
    elif name == "harness-killed":
        os.kill(os.getpid(), signal.SIGKILL)  # as a crash would; SIGKILL, as ASan would report a SIGSEGV
    elif name == "harness-hang":
        signal.pause()
    else:
        call, args, kwargs = CASES[name].build()
    everything = (call, args, kwargs)
    before = _fingerprint(everything)
    report: dict = {"raised": None}
    try:
        call(*args, **kwargs)
    except Exception as error:
        report = {"raised": [c.__name__ for c in type(error).__mro__], "message": str(error)}
    report["unchanged"] = _same(before, _fingerprint(everything))
    return report


def _child_main(name: str, writer) -> None:
    torch.set_num_threads(1)  # no OpenMP team in a forked child
    try:
        report = _attempt(name)
    except BaseException as error:
        report = {"harness_error": f"{type(error).__name__}: {error}"}
    writer.send(report)
    writer.close()


def run_isolated(name: str, method: str = "fork", timeout: float = CHILD_TIMEOUT_S) -> tuple[dict | None, str]:
    """Runs case ``name`` in a child; returns its report (None if it sent none) and how it ended."""
    context = multiprocessing.get_context(method)
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(name, writer), daemon=True)
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


def _check(name: str, case: BadCase, report: dict | None, ending: str) -> None:
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


_FORK_CASES = [name for name, case in CASES.items() if not case.cuda]
_CUDA_CASES = [name for name, case in CASES.items() if case.cuda]


@pytest.mark.parametrize("name", _FORK_CASES)
def test_bad_input_in_child(name: str) -> None:
    report, ending = run_isolated(name)
    _check(name, CASES[name], report, ending)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", _CUDA_CASES)
def test_bad_device_in_spawned_child(name: str) -> None:
    report, ending = run_isolated(name, method="spawn", timeout=180.0)
    _check(name, CASES[name], report, ending)


def test_harness_reports_a_crash() -> None:
    report, ending = run_isolated("harness-killed")
    assert report is None and ending == "killed by signal SIGKILL"
    with pytest.raises(AssertionError, match=r"sent no report.*SIGKILL"):
        _check("harness-killed", BadCase(lambda: None, ValueError, ""), report, ending)


def test_harness_reports_a_missing_error() -> None:
    report, ending = run_isolated("harness-no_error")
    assert report == {"raised": None, "unchanged": True} and ending == "exit code 0"
    with pytest.raises(AssertionError, match="no error raised"):
        _check("harness-no_error", BadCase(lambda: None, ValueError, ""), report, ending)


def test_harness_reports_a_hang() -> None:
    report, ending = run_isolated("harness-hang", timeout=1.0)
    assert report is None and ending.startswith("hung")


def test_every_table_case_is_covered() -> None:
    assert {f"gate-{n}" for n in GATE_TABLE} <= set(CASES)
    assert {f"ngram-{n}" for n in NGRAM_TABLE} <= set(CASES)
    covered = {n.split("-", 1)[1] for n in CASES if n.startswith("ngram")}
    for kind in ("ids_negative", "primes_zero", "primes_negative", "primes_rows", "ids_dtype", "primes_dtype"):
        assert kind in covered, kind
