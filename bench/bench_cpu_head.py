"""CPU LM-head benchmark: ``linear_logprobs(impl="torch")`` vs the bare GEMM and Apple CCE, one run.

    flock /work/heavy.lock python bench/bench_cpu_head.py            # N=4096, D=576, V=49152, fp32, 2 threads
    python bench/bench_cpu_head.py --tokens 512 --reps 2             # quick check

Providers (same inputs, interleaved rep by rep, median of the timed reps after one warm-up):
  gemm          ``torch.mm(H, W.T)``: the bare [N, V] logits GEMM, the roofline (it writes N*V fp32)
  freeprm       ``linear_logprobs(impl="torch")`` forward (the C++ tile kernel when built)
  freeprm_torch the same with the pure-torch fallback forced (``chunked.USE_EXT = False``)
  freeprm_old   the previous forward (2048-row x 32 MB tiles, online logsumexp, per-tile target search),
                kept here verbatim as the before/after reference (fwd mode)
  freeprm_prev  today's forward with the previous backward (git afc461e: 2048-row x 32 MB tiles, multithreaded
                torch ops per tile, per-tile target search), kept here verbatim as the before/after reference
                (full mode)
  naive         ``log_softmax(H @ W.T).gather(targets)``
  cce           ``cut_cross_entropy.linear_cross_entropy(..., impl="torch_compile", reduction="none")``
                (log-prob = -loss); its ``cce`` impl is Triton-on-GPU only
Modes: ``fwd`` (no grad: scoring) and ``full`` (forward + backward of a random grad_output; gemm counts
its three GEMMs). Peak extra memory: each provider runs once more in a child process (inputs built, one
warm-up call, then the peak-RSS mark is reset with ``/proc/self/clear_refs``), reported as the peak RSS
above the RSS before the measured call: in full mode it includes the gradients themselves (d_weight is
[V, D] fp32, 113 MB at the default shape; d_hidden [N, D]). ``--no-memory`` skips it.
Results: ``bench/results/cpu_head_n<N>_d<D>_v<V>.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import rss_kb  # noqa: E402
from freeprm.kernels import chunked, cpu_ext, linear_logprobs  # noqa: E402


def old_forward(hidden, weight, targets):
    """The forward before this change (git 45562f8): 2048-row chunks x 32 MB vocab blocks, online logsumexp."""
    n, vocab = hidden.shape[0], weight.shape[0]
    w32, tgt = weight.float(), targets.long()
    rows = 2048
    block = max(1024, min(vocab, 32 * 2**20 // (4 * min(rows, n))))
    logp = torch.empty(n)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        h, t = hidden[a:b], tgt[a:b]
        m = torch.full((b - a,), float("-inf"))
        s = torch.zeros(b - a)
        zt = torch.zeros(b - a)
        for v0 in range(0, vocab, block):
            v1 = min(v0 + block, vocab)
            z = h.float() @ w32[v0:v1].T
            m_new = torch.maximum(m, z.amax(-1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(-1)
            m = m_new
            inb = (t >= v0) & (t < v1)
            if bool(inb.any()):
                r = inb.nonzero(as_tuple=True)[0]
                zt[r] = z[r, t[r] - v0]
        logp[a:b] = zt - (m + torch.log(s))
    return logp


def prev_backward(grad, hidden, weight, targets, lse):
    """The backward before this change (git afc461e), no logit transform: 2048-row chunks x 32 MB vocab blocks."""
    n, vocab = hidden.shape[0], weight.shape[0]
    w32, tgt, g = weight.float(), targets.long(), grad.float()
    rows = 2048
    block = max(1024, min(vocab, 32 * 2**20 // (4 * min(rows, max(n, 1)))))
    dh = torch.empty_like(hidden)
    dw32 = torch.zeros_like(w32)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        h32, t, ga = hidden[a:b].float(), tgt[a:b], g[a:b]
        dh32 = torch.zeros_like(h32)
        for v0 in range(0, vocab, block):
            v1 = min(v0 + block, vocab)
            z = h32 @ w32[v0:v1].T
            dz = torch.exp(z - lse[a:b, None]).mul_(-ga[:, None])
            inb = (t >= v0) & (t < v1)
            if bool(inb.any()):
                r = inb.nonzero(as_tuple=True)[0]
                dz[r, t[r] - v0] += ga[r]
            dh32.addmm_(dz, w32[v0:v1])
            dw32[v0:v1].addmm_(dz.T, h32)
        dh[a:b] = dh32.to(hidden.dtype)
    return dh, dw32.to(weight.dtype)


class PrevLinearLogprobs(torch.autograd.Function):
    """Today's forward (``chunked.chunked_linear_logprobs_fwd``) with ``prev_backward``."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        logp, lse = chunked.chunked_linear_logprobs_fwd(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return logp

    @staticmethod
    def backward(ctx, grad):
        dh, dw = prev_backward(grad, *ctx.saved_tensors)
        return dh, dw, None


def make_providers(h, w, t, mode: str):
    def with_grad(fn):
        g = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(1))  # the oracle's grad_output

        def run():
            hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
            out = fn(hh, ww)
            torch.autograd.backward(out, g)
            return out.detach(), hh.grad, ww.grad
        return run

    def freeprm_torch(hh, ww):
        chunked.USE_EXT = False
        try:
            return linear_logprobs(hh, ww, t, impl="torch")
        finally:
            chunked.USE_EXT = True

    def naive(hh, ww):
        return torch.log_softmax(hh @ ww.T, -1).gather(-1, t[:, None])[:, 0]

    fns = {"freeprm": lambda hh, ww: linear_logprobs(hh, ww, t, impl="torch"), "freeprm_torch": freeprm_torch,
           "naive": naive}
    if mode == "fwd":
        fns["freeprm_old"] = lambda hh, ww: old_forward(hh, ww, t)
    else:
        fns["freeprm_prev"] = lambda hh, ww: PrevLinearLogprobs.apply(hh, ww, t)
    skipped = {}
    try:
        from cut_cross_entropy import linear_cross_entropy

        fns["cce"] = lambda hh, ww: -linear_cross_entropy(hh, ww, t, reduction="none", impl="torch_compile")
    except Exception as e:  # not installed: pip install -e ".[bench]"
        skipped["cce"] = f"{type(e).__name__}: {e}"
    out = {}
    if mode == "fwd":
        out["gemm"] = lambda: torch.mm(h, w.T)
        for k, fn in fns.items():
            out[k] = (lambda fn=fn: _no_grad(fn, h, w))
    else:
        dz = torch.randn(h.shape[0], w.shape[0])

        def gemm3():
            torch.mm(h, w.T)
            torch.mm(dz, w)
            torch.mm(dz.T, h)
        out["gemm"] = gemm3
        for k, fn in fns.items():
            out[k] = with_grad(fn)
    return out, skipped


def oracle(h, w, t, grads: bool):
    """fp64 log-probs and, for full mode, fp64 (d_hidden, d_weight) of the same random grad_output."""
    hh, ww = h.double().requires_grad_(grads), w.double().requires_grad_(grads)
    out = torch.log_softmax(hh @ ww.T, -1).gather(-1, t[:, None])[:, 0]
    if not grads:
        return (out.detach(),)
    g = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(1))
    torch.autograd.backward(out, g.double())
    return out.detach(), hh.grad, ww.grad


def memory_child(spec: str, h, w, t) -> None:
    """Runs one provider once after a warm-up call; prints the peak RSS above the RSS before the call (MB)."""
    name, mode = spec.split(":")
    fn = make_providers(h, w, t, mode)[0][name]
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = rss_kb("VmRSS")
    out = fn()  # noqa: F841 (the outputs stay alive until the peak is read, as a caller's would)
    print(json.dumps({"peak_extra_mb": (rss_kb("VmHWM") - base) / 1024}))


def peak_extra_mb(name: str, mode: str, argv: list[str]) -> float | None:
    # a fixed mmap threshold: freed large buffers go back to the OS instead of staying in glibc's heap, so the
    # warm-up call's buffers cannot hide the measured call's (glibc raises the threshold after each big free)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, __file__, *argv, "--memory-child", f"{name}:{mode}"],
                       capture_output=True, text=True, env=env)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])["peak_extra_mb"]
    except (IndexError, ValueError, KeyError):
        print(f"memory run of {name} ({mode}) failed: {r.stderr[-500:]}", file=sys.stderr)
        return None


def _no_grad(fn, h, w):
    with torch.no_grad():
        return fn(h, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="fwd,full")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child runs")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # PROVIDER:MODE, internal
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d, v = args.tokens, args.dim, args.vocab
    h = torch.randn(n, d) * 0.5
    w = torch.randn(v, d) * 0.05
    t = torch.randint(0, v, (n,))
    ext = cpu_ext.get() is not None
    if args.memory_child:
        return memory_child(args.memory_child, h, w, t)
    ref = oracle(h, w, t, "full" in args.modes.split(","))
    results, skipped_all = {}, {}
    for mode in args.modes.split(","):
        providers, skipped = make_providers(h, w, t, mode)
        skipped_all.update(skipped)
        times, errs = {k: [] for k in providers}, {}
        for rep in range(args.reps + 1):
            for k, fn in list(providers.items()):
                t0 = time.perf_counter()
                try:
                    out = fn()
                except Exception as e:  # e.g. CCE's torch.compile failing on this machine
                    skipped_all[f"{k} ({mode})"] = f"{type(e).__name__}: {str(e)[:300]}"
                    del providers[k], times[k]
                    continue
                dt = time.perf_counter() - t0
                if rep == 0:
                    if k != "gemm":
                        outs = out if isinstance(out, tuple) else (out,)
                        errs[k] = [float((o.double() - r).abs().max()) for o, r in zip(outs, ref)]
                else:
                    times[k].append(dt)
            print(f"{mode} rep {rep}: " + ", ".join(f"{k} {x[-1]:.2f}s" for k, x in times.items() if x),
                  file=sys.stderr)
        flop = {"fwd": 2, "full": 6}[mode] * n * d * v
        g = statistics.median(times["gemm"])
        rows = []
        mem = {} if args.no_memory else {k: peak_extra_mb(k, mode, sys.argv[1:]) for k in times}
        for k, x in times.items():
            med = statistics.median(x)
            e = errs.get(k)
            rows.append({"provider": k, "median_s": med, "min_s": min(x), "max_s": max(x),
                         "gflops": flop / med / 1e9, "throughput_vs_gemm": g / med,
                         "max_abs_err_vs_fp64": None if e is None else e[0],
                         "max_abs_err_grads_vs_fp64": None if e is None or len(e) < 3 else e[1:],
                         "peak_extra_mb": mem.get(k)})
        results[mode] = rows
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    try:
        import cut_cross_entropy
        cce_v = getattr(cut_cross_entropy, "__version__", None) or __import__("importlib.metadata").metadata.version(
            "cut-cross-entropy")
    except Exception:
        cce_v = None
    env = {"device": f"CPU: {cpu}", "threads": args.threads, "torch": torch.__version__, "cut_cross_entropy": cce_v,
           "cpp_kernel": ext, "python": platform.python_version(), "git_sha": sha,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python bench/bench_cpu_head.py " + " ".join(sys.argv[1:]),
           "note": "shared machine: other processes may have run; ratios are from one interleaved run"}
    out = {"env": env, "setup": {"N": n, "D": d, "V": v, "dtype": "float32", "reps": args.reps},
           "results": results, "skipped": skipped_all}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / f"cpu_head_n{n}_d{d}_v{v}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    md = [f"# CPU LM head: N={n}, D={d}, V={v}, fp32, {args.threads} threads", "",
          f"- device: {env['device']}; torch {env['torch']}; cut-cross-entropy {cce_v}; C++ kernel built: {ext}",
          f"- git {sha}, {env['date']}; command: `{env['command']}`",
          f"- {args.reps} timed reps, interleaved across providers after one warm-up rep; medians. {env['note']}.", ""]
    for mode, rows in results.items():
        md += [f"## {mode}", "", "| provider | median (s) | min..max (s) | GFLOP/s | throughput / gemm | "
               "peak extra MB | max abs err (logp; d_hidden, d_weight) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            e = "" if r["max_abs_err_vs_fp64"] is None else f"{r['max_abs_err_vs_fp64']:.1e}"
            if r["max_abs_err_grads_vs_fp64"]:
                e += "; " + ", ".join(f"{x:.1e}" for x in r["max_abs_err_grads_vs_fp64"])
            m = "" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
            md.append(f"| {r['provider']} | {r['median_s']:.3f} | {r['min_s']:.3f}..{r['max_s']:.3f} | "
                      f"{r['gflops']:.1f} | **{r['throughput_vs_gemm']:.2f}** | {m} | {e} |")
        md.append("")
    for k, why in skipped_all.items():
        md.append(f"- skipped {k}: {why}")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
