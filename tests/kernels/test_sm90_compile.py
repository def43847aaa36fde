"""Compile the Triton kernels ahead of time for an H100 (sm_90) without a GPU.

The interpreter accepts programs the compiler rejects (types of loop-carried values, bounds,
dot shapes), so this compiles every kernel down to a cubin with Triton's bundled ptxas and checks what the hot kernels
compile to: Hopper wgmma dots, a multi-stage cp.async pipeline over D, and no register spills.
The launches are recorded from the real launchers (``triton_common.recording``) on meta tensors,
and their signatures, constexprs and alignment come from Triton's own binder
(``triton_common.compile_spec``): nothing here restates a kernel's arguments.
Runs in a subprocess, since this test session has TRITON_INTERPRET=1.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# the kernels' launches at benchmark-like shapes, recorded from the real launchers on meta tensors
# (so the signatures, constexprs and 16-byte alignment below are what the JIT would see)
N, D, V = 1024, 4096, 128256


def record_launches():
    """{label: Launch} for every kernel of the package, recorded as if on a 132-SM sm_90 GPU."""
    import torch

    from freeprm.kernels import linear_logprob_kernel as L
    from freeprm.kernels import reward_kernel as R
    from freeprm.kernels import segment_kernel as S
    from freeprm.kernels import triton_common as tc

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    out = {}

    def rec(label, f, *args, **kw):
        with tc.recording() as launches:
            f(*args, **kw)
        for i, launch in enumerate(launches):
            out[f"{label}#{i}-{launch.kernel.fn.__name__.strip('_')}"] = launch

    tgt = meta(N, dtype=torch.int64)
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        h, w = meta(N, D, dtype=dt), meta(V, D, dtype=dt)
        rec(f"fwd-{name}-s1", L.linear_logprob_fwd, h, w, tgt, num_splits=1)
        rec(f"fwd-{name}-split-softcap", L.linear_logprob_fwd, h, w, tgt, softcap=30.0)
        rec(f"fwd-{name}-split-entropy", L.linear_logprob_fwd, h, w, tgt, entropy=True)
        rec(f"fwd-{name}-s1-entropy", L.linear_logprob_fwd, h, w, tgt, num_splits=1, entropy=True)
        rec(f"bwd-{name}", L.linear_logprob_bwd, meta(N, dtype=torch.float32), h, w, tgt,
            meta(N, dtype=torch.float32), softcap=30.0)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # fp32 inputs with TF32 dots
    try:
        h32, w32 = meta(N, D, dtype=torch.float32), meta(V, D, dtype=torch.float32)
        rec("fwd-fp32tf32-s1", L.linear_logprob_fwd, h32, w32, tgt, num_splits=1)
        rec("bwd-fp32tf32", L.linear_logprob_bwd, meta(N, dtype=torch.float32), h32, w32, tgt,
            meta(N, dtype=torch.float32))
    finally:
        torch.set_float32_matmul_precision(prev)
    hb, wb = meta(N, D), meta(V, D)
    mask = meta(N, dtype=torch.bool)
    rec("policy_ref-bf16-split", R.policy_ref_reward_fwd, hb, wb, hb, wb, tgt, 0.5, mask)
    rec("policy_ref-bf16-s1", R.policy_ref_reward_fwd, hb, wb, hb, wb, tgt, 0.5, mask, num_splits=1)
    lp, g = meta(N), meta(N, dtype=torch.float32)
    rec("token_reward-fwd", R.token_reward_fwd, lp, meta(N, dtype=torch.float32), mask, 0.5)
    rec("token_reward-bwd", R.token_reward_bwd, g, lp, meta(N, dtype=torch.float16), meta(N, dtype=torch.float32), 0.5)
    cu = meta(65, dtype=torch.int64)
    for op in ("sum", "mean", "min", "max", "last"):
        rec(f"segment_reduce-{op}", S.segment_reduce_fwd, lp, cu, op)
    rec("segment_broadcast", S.segment_broadcast, g[:64], meta(65, dtype=torch.int32), N, torch.bfloat16, mean=True)
    for rev in (False, True):
        rec(f"segment_cumsum-{rev}", S.segment_cumsum_fwd, g, cu, reverse=rev, out_dtype=torch.bfloat16)
    return out


def _compile_all():  # runs in the subprocess
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from freeprm.kernels import triton_common as tc

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results, compiled = {}, {}
    for name, launch in record_launches().items():
        spec = tc.compile_spec(launch, target)
        if spec["key"] in compiled:  # same compiled kernel as an earlier label
            results[name] = compiled[spec["key"]]
            continue
        try:
            k = triton.compile(ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"]),
                               target=target, options=spec["options"])
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[name] = dict(error=f"{type(e).__name__}: {str(e)[:1500]}")
            continue
        ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
        res = dict(wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"),
                   stages=sorted({int(x) for x in re.findall(r"memdesc<(\d+)x\d+x\d+x", ttgir)}))
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage)
            if m:
                res.update(regs=int(m[1]), stack=int(m[2]), local=int(m[3]))
        results[name] = compiled[spec["key"]] = res
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def compiled():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("triton without the compiler backends")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if not lines:
        if "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such file" in proc.stderr):
            pytest.skip("no ptxas for the CUDA backend")
        raise AssertionError(f"compile subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


def test_every_kernel_compiles_for_sm90(compiled):
    errors = {k: v["error"] for k, v in compiled.items() if "error" in v}
    assert not errors, errors
    assert len(compiled) >= 25, sorted(compiled)


HOT = ("linear_logprob_fwd_kernel", "linear_logprob_dx_kernel", "policy_ref_reward_kernel")


def test_hot_kernels_use_wgmma_pipelined_without_spills(compiled):
    hot = {k: r for k, r in compiled.items() if k.endswith(HOT)}
    assert len(hot) >= 12, sorted(compiled)
    for name, r in hot.items():
        assert "error" not in r, (name, r)
        assert r["wgmma"] > 0, f"{name}: no Hopper wgmma in the PTX"
        assert r["cp_async"] > 0 and max(r["stages"], default=0) >= 2, f"{name}: D loop not software-pipelined: {r}"
        if "local" in r:
            assert r["local"] == 0 and r["stack"] == 0, f"{name}: register spills {r}"


if __name__ == "__main__":
    _compile_all()
