"""Compile, ahead of time for an H100/H200 (sm_90) and without a GPU, every kernel the Scorer and the trainer launch.

The compiled set is derived, not listed: the Scorer (reference-free, with a reference, fused; shared-prompt,
packed and padded batches) and one trainer step (forward + backward) run on tiny Llama and soft-capped
Gemma 2 models through the Triton entry points under the interpreter, and the distinct call forms they make
are captured (``_launches.capture_calls``). Each form is then replayed at a Llama-3-8B head (D=4096,
V=128256) for N from 1k to 32k on a 132-SM GPU, in bf16 (the GPU default) and fp32 at torch's default
matmul precision ("highest": IEEE dots), on meta tensors with the launches recorded (``_launches.recording``);
every distinct JIT cache key among those launches is compiled to a cubin with Triton's bundled ptxas. The
library's other options (fp16, entropy, TF32) are added the same way from direct calls.

Checked: every key compiles; the hot kernels use Hopper wgmma (16-bit and TF32 dots; IEEE fp32 dots run
on the FMA units), a multi-stage cp.async pipeline over D, and spill no registers. Compilation runs in a
subprocess (this session has TRITON_INTERPRET=1); Triton's on-disk cache makes reruns quick.
``FREEPRM_COMPILE_TRITON=DIR`` puts DIR first on the subprocess's path, to compile with another Triton
(e.g. the GPU image's 3.6: ``pip install --no-deps --target DIR triton==3.6.0``).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from _launches import Call, capture_calls, scorer_and_trainer_calls

ROOT = Path(__file__).resolve().parents[2]
NS = (1000, 1024, 2048, 3000, 4096, 5000, 8192, 12345, 16384, 20000, 24576, 32768)  # tokens per launch
HOT = ("linear_logprob_fwd_kernel", "linear_logprob_dx_kernel", "policy_ref_reward_kernel")


def _api_calls() -> list[str]:
    """Call forms of the public options the Scorer and trainer do not use (entropy, with and without soft-cap)."""
    from freeprm.kernels import linear_logprobs

    g = torch.Generator().manual_seed(0)
    h, w, t = torch.randn(8, 16, generator=g), torch.randn(40, 16, generator=g), torch.randint(0, 40, (8,), generator=g)
    with capture_calls() as seen:
        for softcap in (None, 30.0):
            linear_logprobs(h, w, t, softcap=softcap, return_entropy=True, impl="triton")
    return sorted(seen)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """[(label, Call key, dtypes, fp32 matmul precision)]: what the compile subprocess replays."""
    derived = scorer_and_trainer_calls(tmp_path_factory.mktemp("calls"))
    out = [(src, k, ["bfloat16", "float32"], "highest") for src, keys in derived.items() for k in keys]
    head = sorted({k for keys in derived.values() for k in keys if Call.from_key(k).entry == "linear_logprobs"})
    out += [("fp16", k, ["float16"], "highest") for k in head]
    out += [("tf32", k, ["float32"], "high") for k in head]
    out += [("entropy", k, ["bfloat16", "float16", "float32"], "highest") for k in _api_calls()]
    return out


def _compile_all(plan_path: str) -> None:  # runs in the subprocess
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from _launches import compile_spec, record_call

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    keys = {}  # JIT key -> (first launch, labels)
    for label, call_key, dtypes, precision in json.loads(Path(plan_path).read_text()):
        call = Call.from_key(call_key)
        for dt in dtypes:
            for rec in record_call(call, NS, [getattr(torch, dt)], precision=precision):
                spec = compile_spec(rec, target)
                k = json.dumps(spec["key"])
                first, labels = keys.setdefault(k, (rec, set()))
                labels.add(f"{label}:{call.entry}:{dt}:{precision}:{rec.name}")
    results = {}
    for k, (rec, labels) in keys.items():
        spec = compile_spec(rec, target)
        res = dict(kernel=rec.name, labels=sorted(labels), dtype=str(rec.args[0].dtype).replace("torch.", ""),
                   dot_prec=rec.consts.get("DOT_PREC"))
        try:
            c = triton.compile(ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"]),
                               target=target, options=spec["options"])
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[k] = dict(res, error=f"{type(e).__name__}: {str(e)[:1500]}")
            continue
        ptx, ttgir = c.asm["ptx"], c.asm["ttgir"]
        res.update(wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"),
                   stages=sorted({int(x) for x in re.findall(r"memdesc<(\d+)x\d+x\d+x", ttgir)}))
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(c.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage)
            if m:
                res.update(regs=int(m[1]), stack=int(m[2]), local=int(m[3]))
        results[k] = res
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def compiled(plan, tmp_path_factory):
    """{JIT key: {kernel, labels, dtype, dot_prec, wgmma, cp_async, stages, regs, stack, local} or {error}}."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.jit import JITFunction
    except ImportError:
        pytest.skip("triton without the compiler backends")
    if not hasattr(JITFunction, "_pack_args"):
        pytest.skip("this Triton's JIT has no _pack_args (the private binder these tests read keys from)")
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([*filter(None, [os.environ.get("FREEPRM_COMPILE_TRITON")]), str(ROOT),
                                         str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, str(path)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if not lines:
        if "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such file" in proc.stderr):
            pytest.skip("no ptxas for the CUDA backend")
        raise AssertionError(f"compile subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


def test_derived_calls_are_what_the_scorer_and_trainer_make(plan):
    forms = {(src, Call.from_key(k)) for src, k, _, _ in plan}
    by = {src: [c for s, c in forms if s == src] for src in ("scorer", "trainer")}

    def kw(c):
        return dict(c.kwargs)

    # the fused reward as the Scorer passes it: mask=None, with and without soft-cap
    fused = [c for c in by["scorer"] if c.entry == "policy_ref_rewards"]
    assert {c.args[6] for c in fused} == {None} and {kw(c)["softcap"] for c in fused} == {None, 3.0}
    # the forward with and without soft-cap; token rewards with a [B, T] mask (padded) and None (packed, shared)
    assert {kw(c)["softcap"] for c in by["scorer"] if c.entry == "linear_logprobs"} == {None, 3.0}
    assert {c.args[2] is None for c in by["scorer"] if c.entry == "token_rewards"} == {True, False}
    assert {c.entry for c in by["scorer"]} >= {"segment_sum", "segment_cumsum"}
    # the trainer's backward, with and without soft-cap
    bwd = [c for c in by["trainer"] if c.backward]
    assert {kw(c)["softcap"] for c in bwd} == {None, 3.0} and all(c.entry == "linear_logprobs" for c in bwd)


def test_every_launch_compiles_for_sm90(compiled):
    errors = {v["kernel"] + " " + v["labels"][0]: v["error"] for v in compiled.values() if "error" in v}
    assert not errors, errors
    labels = [lab for v in compiled.values() for lab in v["labels"]]
    for src in ("scorer", "trainer", "fp16", "tf32", "entropy"):
        assert any(lab.startswith(src + ":") for lab in labels), src
    # the keys the review found missing from the old hand-written list (issue 18, item 4)
    def has(kernel, dtype, prec=None, label=""):
        return any(v["kernel"] == kernel and v["dtype"] == dtype and (prec is None or v["dot_prec"] == prec)
                   and any(label in lab for lab in v["labels"]) for v in compiled.values())

    assert has("linear_logprob_fwd_kernel", "bfloat16", label="scorer:")
    assert has("linear_logprob_dx_kernel", "bfloat16", label="trainer:")
    assert has("policy_ref_reward_kernel", "bfloat16", label="scorer:policy_ref_rewards")
    assert has("linear_logprob_fwd_kernel", "float32", "ieee", label=":highest:")
    assert has("linear_logprob_dx_kernel", "float32", "ieee", label=":highest:")
    assert len(compiled) >= 30, len(compiled)


def test_hot_kernels_use_wgmma_pipelined_without_spills(compiled):
    hot = {k: r for k, r in compiled.items() if r["kernel"] in HOT}
    assert len(hot) >= 15, len(hot)
    for r in hot.values():
        name = f"{r['kernel']} {r['dtype']} {r['dot_prec']} ({r['labels'][0]}...)"
        assert "error" not in r, (name, r)
        if r["dtype"] == "float32" and r["dot_prec"] == "ieee":
            assert r["wgmma"] == 0, f"{name}: IEEE fp32 dots should not use tensor cores"
        else:
            assert r["wgmma"] > 0, f"{name}: no Hopper wgmma in the PTX"
        assert r["cp_async"] > 0 and max(r["stages"], default=0) >= 2, f"{name}: D loop not software-pipelined: {r}"
        if "local" in r:
            assert r["local"] == 0 and r["stack"] == 0, f"{name}: register spills {r}"


if __name__ == "__main__":
    _compile_all(sys.argv[1])
