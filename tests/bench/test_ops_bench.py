"""Micro-benchmarks of every op through pytest-benchmark, each beside its baseline in one group.

Run (bench/README.md): ``pytest tests/bench/test_ops_bench.py --benchmark-enable --benchmark-only
--benchmark-autosave --benchmark-storage=bench/results/micro`` (and ``--benchmark-compare`` to compare with
the last saved run). In the normal test run (``--benchmark-disable`` in pytest's addopts, so in CI) each
case runs once as a smoke test, at the CPU shapes only.

Groups (one per op, mode, device and shape; ``pytest-benchmark compare --group-by=group``):
    linear_logprobs fwd       gemm (h @ W^T, the roofline) | freeprm (ops.linear_logprobs, impl="auto")
    linear_logprobs fwd+bwd   gemm x3 (h @ W^T, dz @ W, dz^T @ h) | freeprm
    policy_ref_rewards fwd    gemm x2 (both models' logits) | freeprm (fused on GPU, chunked on CPU)
    token_rewards, segment_*  copy (read + write the values once: the bandwidth bound) | torch
                              (the plain-torch oracle; GPU only, on CPU it is what "auto" runs) | freeprm
CPU shapes: the SmolLM2-135M head (D=576, V=49152) at N=512 tokens, fp32; 64k values in 1024 segments. With
CUDA and ``FREEPRM_TEST_GPU=1`` also the GPU shapes: a Llama-3-8B head (D=4096, V=128256) at N=4096 and
16384, bf16; 1M values in 8192 segments. ``impl="auto"`` takes the Triton kernels on CUDA and the CPU paths
(chunked C++ / torch) on CPU, as users get them. Inputs come from ``make_inputs`` of bench/bench_kernels.py
(one definition for both benchmarks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from freeprm.kernels import (
    linear_logprobs,
    oracle,
    policy_ref_rewards,
    segment_cumsum,
    segment_reduce,
    segment_sum,
    token_rewards,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_kernels import _segments, make_inputs  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"  # compiled kernels only
HEADS = [("cpu", 512, 576, 49152, torch.float32)]
SMALL = [("cpu", 65536, 1024)]
if CUDA:
    HEADS += [("cuda", 4096, 4096, 128256, torch.bfloat16), ("cuda", 16384, 4096, 128256, torch.bfloat16)]
    SMALL += [("cuda", 1 << 20, 8192)]


def _id(case):
    return "-".join(str(x).replace("torch.", "") for x in case)


def _bench(benchmark, fn, device):
    """``benchmark(fn)`` with a device sync after each call on CUDA (pytest-benchmark reads a host clock) and,
    when timing, one untimed call first (Triton compiles, the C++ CPU kernel's first load, allocator warm-up)."""
    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if not benchmark.disabled:
        run()
    return benchmark(run)


@pytest.fixture(scope="module", params=HEADS, ids=_id)
def head(request):
    device, n, d, v, dtype = request.param
    hidden, weight, targets, grad_out = make_inputs(n, d, v, dtype, device)
    return dict(device=device, n=n, d=d, v=v, dtype=dtype, hidden=hidden, weight=weight, targets=targets,
                grad_out=grad_out, tag=f"{device} N={n} D={d} V={v} {str(dtype).replace('torch.', '')}")


@pytest.mark.parametrize("provider", ["gemm", "freeprm"])
def test_linear_logprobs_fwd(benchmark, head, provider):
    h, w, t = head["hidden"], head["weight"], head["targets"]
    benchmark.group = f"linear_logprobs fwd {head['tag']}"
    fns = {"gemm": lambda: h @ w.T, "freeprm": lambda: linear_logprobs(h, w, t)}
    with torch.no_grad():
        out = _bench(benchmark, fns[provider], head["device"])
    assert out.shape == ((head["n"], head["v"]) if provider == "gemm" else (head["n"],))
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("provider", ["gemm x3", "freeprm"])
def test_linear_logprobs_fwd_bwd(benchmark, head, provider):
    h = head["hidden"].detach().clone().requires_grad_()
    w = head["weight"].detach().clone().requires_grad_()
    t, g = head["targets"], head["grad_out"]
    benchmark.group = f"linear_logprobs fwd+bwd {head['tag']}"
    dz = torch.randn(head["n"], head["v"], device=head["device"]).to(head["dtype"]) * 1e-3 if provider != "freeprm" \
        else None

    def gemms():
        with torch.no_grad():
            return h @ w.T, dz @ w, dz.T @ h

    def freeprm():
        h.grad = w.grad = None
        linear_logprobs(h, w, t).backward(g)
        return h.grad, w.grad

    out = _bench(benchmark, gemms if provider != "freeprm" else freeprm, head["device"])
    assert out[-2].shape == (head["n"], head["d"]) and out[-1].shape == (head["v"], head["d"])  # d_hidden, d_weight
    assert all(bool(torch.isfinite(x).all()) for x in out)


@pytest.mark.parametrize("provider", ["gemm x2", "freeprm"])
def test_policy_ref_rewards_fwd(benchmark, head, provider):
    hp, wp, t = head["hidden"], head["weight"], head["targets"]
    hr, wr = hp.flip(0), wp.flip(1)  # a second "model" of the same shapes
    benchmark.group = f"policy_ref_rewards fwd {head['tag']}"
    fns = {"gemm x2": lambda: (hp @ wp.T, hr @ wr.T),
           "freeprm": lambda: policy_ref_rewards(hp, wp, hr, wr, t, 0.05)}
    with torch.no_grad():
        out = _bench(benchmark, fns[provider], head["device"])
    if provider == "freeprm":
        assert out.shape == (head["n"],) and bool(torch.isfinite(out).all())


@pytest.fixture(scope="module", params=SMALL, ids=_id)
def small(request):
    device, n, k = request.param
    g = torch.Generator().manual_seed(4)
    return dict(device=device, n=n, k=k, tag=f"{device} N={n} K={k}",
                lp=torch.randn(n, generator=g).to(device), lr=torch.randn(n, generator=g).to(device),
                mask=(torch.rand(n, generator=g) > 0.2).to(device), cu=_segments(n, k, device))


SMALL_OPS = {  # name: fn(values, small case, impl)
    "token_rewards": lambda x, s, impl: token_rewards(x, s["lr"], s["mask"], 0.05, impl=impl),
    "segment_sum": lambda x, s, impl: segment_sum(x, s["cu"], impl=impl),
    "segment_cumsum": lambda x, s, impl: segment_cumsum(x, s["cu"], impl=impl),
    "segment_reduce_min": lambda x, s, impl: segment_reduce(x, s["cu"], "min", impl=impl),
    "segment_reduce_mean": lambda x, s, impl: segment_reduce(x, s["cu"], "mean", impl=impl),
}


@pytest.mark.parametrize("provider", ["copy", "torch", "freeprm"])
@pytest.mark.parametrize("op", list(SMALL_OPS))
def test_small_op_fwd(benchmark, small, op, provider):
    if provider == "torch" and small["device"] == "cpu":
        pytest.skip("on CPU impl='auto' is the torch oracle: one row suffices")
    x = small["lp"]
    benchmark.group = f"{op} fwd {small['tag']}"
    fns = {"copy": lambda: x.clone(), "torch": lambda: SMALL_OPS[op](x, small, "torch"),
           "freeprm": lambda: SMALL_OPS[op](x, small, "auto")}
    with torch.no_grad():
        out = _bench(benchmark, fns[provider], small["device"])
    if provider == "freeprm":  # same values as the oracle
        want = SMALL_OPS[op](x, small, "torch")
        torch.testing.assert_close(out, want, equal_nan=True, atol=1e-4, rtol=1e-5)


def test_oracle_is_what_the_groups_compare_against():
    """The baselines above are the plain-torch definitions of the ops (freeprm.kernels.oracle)."""
    s = dict(lr=torch.zeros(3), mask=torch.tensor([True, False, True]), cu=torch.tensor([0, 1, 3]))
    x = torch.tensor([1.0, 2.0, 3.0])
    want = oracle.token_rewards(x, s["lr"], s["mask"], 0.05)
    assert SMALL_OPS["token_rewards"](x, s, "torch").tolist() == want.tolist()
    assert SMALL_OPS["segment_sum"](x, s, "torch").tolist() == [1.0, 5.0]
