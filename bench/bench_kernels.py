"""Benchmark: linear + gathered log-softmax (per-token log-probs), every provider on the same inputs.

    python bench/bench_kernels.py            # GPU: 3 (D, V) shapes x tokens {1k, 8k, 32k}, bf16
    python bench/bench_kernels.py --quick    # one small shape (CPU: tiny shape, interpreter Triton)
    python bench/bench_kernels.py --config BLOCK_N=64,BLOCK_V=256,BLOCK_D=64,num_warps=8,num_stages=3  # tile sweep
    python bench/bench_kernels.py --compile-sweep 1000,1024,3000,4096,8192,16384   # compile time over N

Providers (each reported, or listed as skipped with the reason):
    gemm      the bare cuBLAS GEMM(s) of the same shape: the roofline
              fwd: h @ W^T;  bwd: dz @ W and dz^T @ h;  full: all three
    naive     logits = h @ W^T, fp32 log_softmax, gather (autograd backward)
    compile   torch.compile of naive
    chunked   freeprm.kernels.linear_logprobs(impl="torch")
    liger     Liger-Kernel fused linear cross-entropy, reduction="none" (logp = -loss), if importable
    cce       Apple cut_cross_entropy.linear_cross_entropy, reduction="none", if importable
    freeprm   freeprm.kernels.linear_logprobs(impl="triton")
    freeprm_rows  the same with the row-split backward forced (bwd_split="rows": a [V, D] fp32 d_weight
              accumulator), to see what the default vocab-split backward saves in memory
Modes: fwd (no-grad inputs, the scoring pass), bwd (backward of a kept graph, random grad_output),
full (fwd + bwd). TFLOP/s counts 2 / 6 / 8 * N * D * V for fwd / bwd / full (the backward counts
the logit recompute; the GEMM rows count the 2 / 4 / 6 * N * D * V they do); "x GEMM" is the GEMM
time over the provider's time in the same mode (fwd: one GEMM, bwd: two, full: three) and
"tput/GEMM" the provider's TFLOP/s over the GEMMs' TFLOP/s. Extra memory is the peak allocated during a call minus the inputs
and the unavoidable outputs (log-probs and, for bwd/full, the two gradients). Errors are max abs
vs an fp32 computation of the same inputs. A second table times token_rewards and the segment ops
(Triton vs plain torch, forward and forward + backward). Results: JSON + markdown in bench/results/;
with ``--jsonl PATH`` every row is also appended to PATH (flushed and synced) as soon as it is measured,
so a run cut short by a time limit keeps what it measured (bench/gpu_checklist.sh).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton only through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freeprm.kernels import (  # noqa: E402
    linear_logprobs,
    policy_ref_rewards,
    segment_cumsum,
    segment_reduce,
    segment_sum,
    token_rewards,
)
from freeprm.kernels import oracle as oracle_ops

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 128256), (576, 49152), (2304, 256000)]  # (D, V): Llama-3 8B, SmolLM2-135M, Gemma-2 2B
TOKENS = [1024, 8192, 32768]
PROVIDERS = ["gemm", "naive", "compile", "chunked", "liger", "cce", "freeprm"]
EXTRA_PROVIDERS = ["freeprm_rows"]
MODES = ["fwd", "bwd", "full"]
FLOP_FACTOR = {"fwd": 2, "bwd": 6, "full": 8}  # what a logits-free provider computes (bwd recomputes)
GEMM_FLOP_FACTOR = {"fwd": 2, "bwd": 4, "full": 6}  # what the bare GEMMs compute
GEMMS_PER_MODE = {"fwd": 1, "bwd": 2, "full": 3}


class Skip(Exception):
    """Provider not available here (not installed, needs CUDA)."""


# ---------------------------------------------------------------------------------------------
# providers: each returns fn(hidden, weight, targets) -> float32 log-probs [N]
# ---------------------------------------------------------------------------------------------


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.T  # [N, V] in the input dtype
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _loss_tensor(out):
    """Per-token loss from a provider's return value (a tensor, a tuple, or an output dataclass)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "loss"):
        return out.loss
    return out[0]


def make_provider(name: str, device: torch.device):
    if name == "naive":
        return naive_logprobs
    if name == "compile":
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one graph per (shape, tokens) case
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        return torch.compile(naive_logprobs, dynamic=False)
    if name == "chunked":
        return lambda h, w, t: linear_logprobs(h, w, t, impl="torch")
    if name == "freeprm":
        return lambda h, w, t: linear_logprobs(h, w, t, impl="triton")
    if name == "freeprm_rows":
        from freeprm.kernels.linear_logprob_kernel import triton_linear_logprobs

        return lambda h, w, t: triton_linear_logprobs(h, w, t, bwd_split="rows")
    if name in ("liger", "cce"):
        if device.type != "cuda":
            raise Skip("needs CUDA")
        try:
            if name == "liger":
                from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as ce
            else:
                from cut_cross_entropy import linear_cross_entropy as ce
        except ImportError as e:
            raise Skip(f"not installed ({e.name or e})") from None
        return lambda h, w, t: -_loss_tensor(ce(h, w, t, reduction="none")).float()
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SMOKE = False  # --smoke: one timed call per measurement, no warm-up (checks the logic; times mean nothing)


def bench_ms(fn, device, grad_to_none=(), quick=False):
    """(median, p20, p80) milliseconds."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms
    if device.type == "cuda":
        import triton.testing

        rep, warm = (40, 10) if quick else (200, 25)
        med, lo, hi = triton.testing.do_bench(fn, warmup=warm, rep=rep, grad_to_none=list(grad_to_none),
                                              quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    times = []
    fn()  # warm-up (compiles)
    for _ in range(3 if quick else 10):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[-1]


def peak_extra_bytes(fn, device, keep_bytes):
    """Peak allocated during fn() beyond what was allocated before it and the outputs it keeps."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base - keep_bytes)


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


# ---------------------------------------------------------------------------------------------
# one (shape, tokens) case
# ---------------------------------------------------------------------------------------------


def make_inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    grad_out = torch.randn(n, generator=g).to(device)
    return hidden, weight, targets, grad_out


def fp32_oracle(hidden, weight, targets, grad_out):
    """fp32 log-probs and grads of the same inputs (chunked torch path: never [N, V])."""
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    out = linear_logprobs(h, w, targets, impl="torch")
    dh, dw = torch.autograd.grad(out, (h, w), grad_out)
    return out.detach(), dh, dw


def run_gemm(hidden, weight, device, quick):
    n, v = hidden.shape[0], weight.shape[0]
    dz = torch.randn(n, v, device=device).to(hidden.dtype) * 1e-3
    fns = {
        "fwd": lambda: hidden @ weight.T,
        "bwd": lambda: (dz @ weight, dz.T @ hidden),
        "full": lambda: (hidden @ weight.T, dz @ weight, dz.T @ hidden),
    }
    res = {m: bench_ms(f, device, quick=quick) for m, f in fns.items()}
    del dz
    return res


def run_provider(fn, hidden, weight, targets, grad_out, device, quick):
    res = {}
    h0, w0 = hidden.detach(), weight.detach()
    with torch.no_grad():
        res["fwd"] = bench_ms(lambda: fn(h0, w0, targets), device, quick=quick)
        out = fn(h0, w0, targets)
        res["mem_fwd"] = peak_extra_bytes(lambda: fn(h0, w0, targets), device, _nbytes(out))
        del out
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, targets)
    res["bwd"] = bench_ms(lambda: out.backward(grad_out, retain_graph=True), device, grad_to_none=(h, w), quick=quick)
    del out
    h.grad = w.grad = None

    def full():
        fn(h, w, targets).backward(grad_out)

    res["full"] = bench_ms(full, device, grad_to_none=(h, w), quick=quick)
    h.grad = w.grad = None
    res["mem_full"] = peak_extra_bytes(full, device, _nbytes(hidden, weight) + 4 * hidden.shape[0])
    h.grad = w.grad = None
    out = fn(h, w, targets)
    dh, dw = torch.autograd.grad(out, (h, w), grad_out)
    return res, (out.detach(), dh, dw)


def bench_case(d, v, n, dtype, device, providers, quick, emit=None):
    """Rows of one (D, V, N) case, one per provider; ``emit(row)`` is called as each row is done."""
    rows = []
    def done(row):
        rows.append(row)
        if emit is not None:
            emit(row)

    hidden, weight, targets, grad_out = make_inputs(n, d, v, dtype, device)
    oracle = fp32_oracle(hidden, weight, targets, grad_out)
    gemm = None
    for name in providers:
        row = dict(D=d, V=v, N=n, provider=name, status="ok")
        try:
            if name == "gemm":
                res, got = run_gemm(hidden, weight, device, quick), None
                gemm = res
            else:
                fn = make_provider(name, device)
                res, got = run_provider(fn, hidden, weight, targets, grad_out, device, quick)
        except Skip as e:
            row["status"] = f"skipped: {e}"
            done(row)
            continue
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
            done(row)
            torch.cuda.empty_cache()
            continue
        except Exception as e:  # noqa: BLE001 - a broken provider must not stop the others
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            done(row)
            continue
        for m in MODES:
            med, lo, hi = res[m]
            row[f"{m}_ms"], row[f"{m}_ms_p20"], row[f"{m}_ms_p80"] = med, lo, hi
            flops = (GEMM_FLOP_FACTOR if name == "gemm" else FLOP_FACTOR)[m] * n * d * v
            row[f"{m}_tflops"] = flops / (med * 1e-3) / 1e12
            if gemm is not None:
                row[f"{m}_x_gemm"] = gemm[m][0] / med  # time ratio
                gemm_tflops = GEMM_FLOP_FACTOR[m] * n * d * v / (gemm[m][0] * 1e-3) / 1e12
                row[f"{m}_tput_vs_gemm"] = row[f"{m}_tflops"] / gemm_tflops  # throughput ratio
        for m in ("mem_fwd", "mem_full"):
            if res.get(m) is not None:
                row[f"extra_{m[4:]}_bytes"] = res[m]
                row[f"extra_{m[4:]}_bytes_per_token"] = res[m] / n
        if got is not None:
            for part, a, o in zip(("logp", "dh", "dw"), got, oracle):
                row[f"err_{part}"] = (a.float() - o).abs().max().item()
        done(row)
        del got
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_policy_ref(d, v, n, dtype, device, quick):
    """Scoring pass (no grad): rewards from two models, fused kernel vs two separate passes."""
    hp, wp, t, _ = make_inputs(n, d, v, dtype, device, seed=1)
    hr, wr, _, _ = make_inputs(n, d, v, dtype, device, seed=2)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    cases = {
        "naive x2": lambda: 0.1 * (naive_logprobs(hp, wp, t) - naive_logprobs(hr, wr, t)),
        "chunked x2": lambda: policy_ref_rewards(hp, wp, hr, wr, t, 0.1, mask, impl="torch"),
        "freeprm x2": lambda: 0.1 * (linear_logprobs(hp, wp, t, impl="triton") - linear_logprobs(hr, wr, t, impl="triton")),
        "freeprm fused": lambda: policy_ref_rewards(hp, wp, hr, wr, t, 0.1, mask, impl="triton"),
    }
    rows = []
    with torch.no_grad():
        oracle = oracle_ops.policy_ref_rewards(hp.float(), wp.float(), hr.float(), wr.float(), t, 0.1, mask) \
            if n * v <= 2**28 else None
        for name, fn in cases.items():
            row = dict(D=d, V=v, N=n, provider=name, status="ok")
            try:
                med, lo, hi = bench_ms(fn, device, quick=quick)
                row.update(fwd_ms=med, fwd_ms_p20=lo, fwd_ms_p80=hi,
                           fwd_tflops=2 * 2 * n * d * v / (med * 1e-3) / 1e12)
                if oracle is not None:
                    row["err_reward"] = (fn().float() - oracle).abs().max().item()
            except torch.cuda.OutOfMemoryError:
                row["status"] = "oom"
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
    return rows


def _segments(n_tokens, n_segments, device, seed=3):
    """Random cu_seqlens offsets [K+1] over n_tokens, some segments empty."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, n_tokens + 1, (n_segments - 1,), generator=g).sort().values
    return torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n_tokens])]).to(device)


def bench_small_ops(n, k, device, quick):
    """token_rewards and segment_* (Triton kernels vs the plain-torch oracle) on N values, K segments.

    fwd: forward only; full: forward + backward with a random upstream gradient. If the Triton
    rows do not beat torch on a GPU, the kernels go (docs/kernels.md).
    """
    g = torch.Generator().manual_seed(4)
    lp = torch.randn(n, generator=g).to(device)
    lr = torch.randn(n, generator=g).to(device)
    mask = (torch.rand(n, generator=g) > 0.2).to(device)
    cu = _segments(n, k, device)
    go_n, go_k = torch.randn(n, generator=g).to(device), torch.randn(k, generator=g).to(device)
    cases = {  # name: (fn(values, impl), upstream grad)
        "token_rewards": (lambda x, impl: token_rewards(x, lr, mask, 0.5, impl=impl), go_n),
        "segment_sum": (lambda x, impl: segment_sum(x, cu, impl=impl), go_k),
        "segment_cumsum": (lambda x, impl: segment_cumsum(x, cu, impl=impl), go_n),
        "segment_reduce_min": (lambda x, impl: segment_reduce(x, cu, "min", impl=impl), go_k),
        "segment_reduce_mean": (lambda x, impl: segment_reduce(x, cu, "mean", impl=impl), go_k),
    }
    rows = []
    for name, (fn, go) in cases.items():
        times = {}
        for impl in ("torch", "triton"):
            row = dict(op=name, N=n, K=k, impl=impl, status="ok")
            try:
                x = lp.detach().clone().requires_grad_()

                def full():
                    out = fn(x, impl)
                    out.backward(go.to(out.dtype))

                with torch.no_grad():
                    row["fwd_ms"], row["fwd_ms_p20"], row["fwd_ms_p80"] = bench_ms(lambda: fn(lp, impl), device,
                                                                                    quick=quick)
                row["full_ms"], row["full_ms_p20"], row["full_ms_p80"] = bench_ms(full, device, grad_to_none=(x,),
                                                                                  quick=quick)
                with torch.no_grad():
                    ref = fn(lp, "torch").float()
                    got = fn(lp, impl).float()
                ok = torch.isfinite(ref)
                row["err"] = (got[ok] - ref[ok]).abs().max().item() if bool(ok.any()) else 0.0
                reads = 3 if name == "token_rewards" else 1  # lp, lp_ref, mask vs values only
                row["fwd_GBps"] = n * lp.element_size() * reads / (row["fwd_ms"] * 1e-3) / 1e9
                times[impl] = (row["fwd_ms"], row["full_ms"])
            except Exception as e:  # noqa: BLE001 - report and continue
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
        if len(times) == 2:  # speed-up of the kernel over torch, same run
            rows[-1]["fwd_speedup_vs_torch"] = times["torch"][0] / times["triton"][0]
            rows[-1]["full_speedup_vs_torch"] = times["torch"][1] / times["triton"][1]
    return rows


def bench_compile_sweep(d, v, dtype, device, tokens):
    """First-call (compile + run) and steady-state milliseconds over a sweep of N: the forward, then forward +
    backward. Run it in a fresh process with an empty TRITON_CACHE_DIR to see the compile cost; after the
    first N only a new compile key (vocab splits on / off, a new backward slab shape) should pay again."""
    rows = []
    w = make_inputs(1, d, v, dtype, device)[1]
    for n in tokens:
        h, _, t, g = make_inputs(n, d, 1, dtype, device)
        t = torch.randint(0, v, (n,), device=device)
        hg = h.detach().clone().requires_grad_()

        def fwd():
            return linear_logprobs(h, w, t, impl="triton")

        def full():
            linear_logprobs(hg, w, t, impl="triton").backward(g)

        row = dict(D=d, V=v, N=n)
        for name, fn in (("", fwd), ("full_", full)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            row[f"{name}first_call_ms"] = (time.perf_counter() - t0) * 1e3
            row[f"{name}steady_ms"] = bench_ms(fn, device, grad_to_none=(hg,), quick=True)[0]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def environment(device):
    import triton

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "freeprm", "bench"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        sha += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                git_sha=sha, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                triton_interpret=os.environ.get("TRITON_INTERPRET", "0"), python=platform.python_version())


class RowSink:
    """Prints each result row as JSON and, with a path, appends it there at once (flushed and fsynced)."""

    def __init__(self, path: str | None, env: dict, tag: str | None):
        self.path, self.extra = path, {"tag": tag} if tag else {}
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.emit(dict(kind="env", **env))

    def emit(self, row: dict, kind: str | None = None) -> None:
        line = json.dumps({**self.extra, **({"kind": kind} if kind else {}), **row})
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())


def _f(x, fmt="{:.3g}"):
    return "" if x is None else fmt.format(x)


def _md_table(title, columns, rows, cells, lead=()):
    """A markdown section; a row whose status is not ok shows its ``lead`` fields, then the status."""
    if not rows:
        return []
    out = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r.get("status", "ok") != "ok":
            vals = [r[k] for k in lead] + [r["status"]]
            out.append("| " + " | ".join(str(x) for x in vals) + " |" + " |" * (len(columns) - len(vals)))
        else:
            out.append("| " + " | ".join(str(x) for x in cells(r)) + " |")
    return out + [""]


def markdown(env, rows, pr_rows, dtype, small_rows=(), sweep_rows=()):
    out = [f"# freeprm kernel benchmark: linear + gathered log-softmax ({dtype})", ""]
    out += [f"- {k}: `{v}`" for k, v in env.items()]
    out += ["", "Times are medians in ms [p20-p80]; TFLOP/s counts 2/6/8*N*D*V (GEMM rows: the 2/4/6*N*D*V they "
            "do); x GEMM = GEMM time / time (1, 2, 3 GEMMs); tput/GEMM = TFLOP/s / GEMM TFLOP/s; extra memory "
            "beyond inputs and outputs (B/token = bytes / N); errors are max abs vs fp32.", ""]
    cases = sorted({(r["D"], r["V"], r["N"]) for r in rows}, key=lambda c: (SHAPES.index(c[:2]) if c[:2] in SHAPES else -1, c[2]))
    for d, v, n in cases:
        out += [f"## D={d}, V={v}, N={n}", "",
                "| provider | fwd ms | bwd ms | full ms | fwd TFLOP/s | full TFLOP/s | fwd x GEMM | full x GEMM "
                "| fwd tput/GEMM | full tput/GEMM | extra fwd MB | extra full MB | full B/token | err logp | err dh "
                "| err dw |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if (r["D"], r["V"], r["N"]) != (d, v, n):
                continue
            if r["status"] != "ok":
                out.append(f"| {r['provider']} | {r['status']} |" + " |" * 14)
                continue
            ms = [f"{_f(r[f'{m}_ms'])} [{_f(r[f'{m}_ms_p20'])}-{_f(r[f'{m}_ms_p80'])}]" for m in MODES]
            mb = [_f(r.get(k) and r[k] / 2**20, "{:.1f}") if r.get(k) is not None else "" for k in
                  ("extra_fwd_bytes", "extra_full_bytes")]
            out.append("| " + " | ".join([
                r["provider"], *ms, _f(r["fwd_tflops"], "{:.3g}"), _f(r["full_tflops"], "{:.3g}"),
                _f(r.get("fwd_x_gemm"), "{:.2f}"), _f(r.get("full_x_gemm"), "{:.2f}"),
                _f(r.get("fwd_tput_vs_gemm"), "{:.2f}"), _f(r.get("full_tput_vs_gemm"), "{:.2f}"), *mb,
                _f(r.get("extra_full_bytes_per_token"), "{:.0f}"),
                _f(r.get("err_logp")), _f(r.get("err_dh")), _f(r.get("err_dw"))]) + " |")
        out.append("")
    out += _md_table("Policy - reference rewards (scoring pass, no grad)",
                     ["D", "V", "N", "provider", "fwd ms", "TFLOP/s (4NDV)", "err reward"], pr_rows,
                     lambda r: [r["D"], r["V"], r["N"], r["provider"],
                                f"{_f(r['fwd_ms'])} [{_f(r['fwd_ms_p20'])}-{_f(r['fwd_ms_p80'])}]",
                                _f(r["fwd_tflops"], "{:.3g}"), _f(r.get("err_reward"))], lead=("D", "V", "N", "provider"))
    out += _md_table("token_rewards and segment ops (Triton vs plain torch)",
                     ["op", "N", "K", "impl", "fwd ms", "full ms", "fwd GB/s", "speed-up fwd", "speed-up full", "err"],
                     small_rows,
                     lambda r: [r["op"], r["N"], r["K"], r["impl"], _f(r["fwd_ms"]), _f(r["full_ms"]),
                                _f(r["fwd_GBps"]), _f(r.get("fwd_speedup_vs_torch"), "{:.2f}"),
                                _f(r.get("full_speedup_vs_torch"), "{:.2f}"), _f(r.get("err"))], lead=("op", "N", "K", "impl"))
    out += _md_table("Compile sweep (first call vs steady state)",
                     ["D", "V", "N", "fwd first call ms", "fwd steady ms", "fwd+bwd first call ms", "fwd+bwd steady ms"],
                     sweep_rows,
                     lambda r: [r["D"], r["V"], r["N"], _f(r["first_call_ms"]), _f(r["steady_ms"]),
                                _f(r.get("full_first_call_ms")), _f(r.get("full_steady_ms"))])
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one small shape, fewer repetitions")
    p.add_argument("--smoke", action="store_true", help="one timed call per measurement, no warm-up: checks that "
                   "every step runs (bench/gpu_checklist.sh --dry-run); the times mean nothing")
    p.add_argument("--shapes", default=None, help="D:V pairs, comma separated, e.g. 4096:128256,576:49152")
    p.add_argument("--tokens", default=None, help="token counts, comma separated")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--no-policy-ref", action="store_true", help="skip the fused policy-ref rewards table")
    p.add_argument("--small-ops", default=None, help="N:K for the token_rewards / segment_* table "
                   "(default 1048576:8192 on GPU, 4096:64 on CPU); 0 skips it")
    p.add_argument("--config", default=None, help="pin a Triton tile config for this run, e.g. "
                   "BLOCK_N=64,BLOCK_V=256,BLOCK_D=64,num_warps=8,num_stages=3 (sets FREEPRM_TRITON_CONFIG)")
    p.add_argument("--compile-sweep", default=None, help="token counts for a first-call vs steady-state sweep of "
                   "the forward (GPU), e.g. 1000,1024,3000,4096,8192,16384")
    p.add_argument("--fp32-precision", default=None, choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision for this run (fp32 Triton dots: IEEE at 'highest', "
                        "else TF32); default: torch's")
    p.add_argument("--jsonl", default=None, help="append every result row to this file as soon as it exists")
    p.add_argument("--tag", default=None, help="a label added to every --jsonl row (e.g. the checklist step)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.config:
        os.environ["FREEPRM_TRITON_CONFIG"] = args.config
    global SMOKE
    SMOKE = args.smoke
    if args.fp32_precision:
        torch.set_float32_matmul_precision(args.fp32_precision)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    elif args.quick:
        shapes = [(576, 49152)] if device.type == "cuda" else [(64, 1000)]
    else:
        shapes = SHAPES
    if args.tokens:
        tokens = [int(x) for x in args.tokens.split(",")]
    elif args.quick:
        tokens = [2048] if device.type == "cuda" else [128]
    else:
        tokens = TOKENS
    providers = [x for x in args.providers.split(",") if x]

    env = environment(device)
    env["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    env["triton_config"] = os.environ.get("FREEPRM_TRITON_CONFIG", "pinned default")
    sink = RowSink(args.jsonl, env, args.tag)
    rows, pr_rows = [], []
    for d, v in shapes:
        for n in tokens if providers else ():
            case_rows = bench_case(d, v, n, dtype, device, providers, args.quick,
                                   emit=lambda r: sink.emit(r, "head"))
            rows += case_rows
        if not args.no_policy_ref:
            for r in bench_policy_ref(d, v, min(tokens[-1], 8192), dtype, device, args.quick):
                sink.emit(r, "policy_ref")
                pr_rows.append(r)

    small_rows, sweep_rows = [], []
    small = args.small_ops or ("1048576:8192" if device.type == "cuda" else "4096:64")
    if small != "0":
        n_small, k_small = (int(x) for x in small.split(":"))
        for r in bench_small_ops(n_small, k_small, device, args.quick):
            sink.emit(r, "small_ops")
            small_rows.append(r)
    if args.compile_sweep:
        for d, v in shapes:
            for r in bench_compile_sweep(d, v, dtype, device, [int(x) for x in args.compile_sweep.split(",")]):
                sink.emit(r, "compile_sweep")
                sweep_rows.append(r)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else env["device"].replace(" ", "_").replace("/", "_")
    stem = out_dir / f"kernels_{tag}_{env['date'][:10]}{'_quick' if args.quick else ''}"
    dname = str(dtype).replace("torch.", "")
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, dtype=dname, quick=args.quick, rows=rows,
                                                         policy_ref=pr_rows, small_ops=small_rows,
                                                         compile_sweep=sweep_rows), indent=1))
    stem.with_suffix(".md").write_text(markdown(env, rows, pr_rows, dname, small_rows, sweep_rows))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
