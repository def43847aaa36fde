"""Compile the Triton kernels ahead of time for an H100 (sm_90) without a GPU.

The interpreter accepts programs the compiler rejects (types of loop-carried values, bounds,
dot shapes), so this compiles every kernel down to a cubin with Triton's bundled ptxas, with the
16-byte alignment the JIT would see at the benchmark shapes, and checks what the hot kernels
compile to: Hopper wgmma dots, a multi-stage cp.async pipeline over D, and no register spills.
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

# ints that are multiples of 16 at the benchmark shapes; pointers are 16-byte aligned too
ALIGNED_INTS = {"V", "D", "DP", "DR", "stride_h", "stride_w", "stride_dx", "stride_hp", "stride_wp", "stride_hr",
                "stride_wr"}


def _compile_all():  # runs in the subprocess
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import freeprm.kernels.linear_logprob_kernel as L
    import freeprm.kernels.reward_kernel as R
    import freeprm.kernels.segment_kernel as S

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = {}

    def build(name, fn, sig, consts, num_warps=8, num_stages=3):
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
                 for k, v in sig.items() if v.startswith("*") or k in ALIGNED_INTS}
        try:
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                               options=dict(num_warps=num_warps, num_stages=num_stages))
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[name] = dict(error=f"{type(e).__name__}: {str(e)[:1500]}")
            return
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
        results[name] = res

    tile = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)
    for dt in ("bf16", "fp16"):
        p = "*" + dt
        for splits in (1, 4):
            build(f"fwd-{dt}-s{splits}", L._linear_logprob_fwd_kernel,
                  dict(H=p, W=p, TGT="*i64", OUT="*fp32", LSE="*fp32", PART="*fp32", N="i32", V="i32", D="i32",
                       stride_h="i32", stride_w="i32", scale="fp32", softcap="fp32", HAS_SOFTCAP="constexpr",
                       SPLITS="constexpr", BLOCK_N="constexpr", BLOCK_V="constexpr", BLOCK_D="constexpr",
                       UPCAST_DOT="constexpr", DOT_PREC="constexpr"),
                  dict(HAS_SOFTCAP=splits == 4, SPLITS=splits, UPCAST_DOT=False, DOT_PREC="tf32", **tile))
        build(f"dx-{dt}", L._linear_logprob_dx_kernel,
              dict(H=p, W=p, TGT="*i64", LSE="*fp32", G="*fp32", DX=p, C="i32", V="i32", D="i32", stride_h="i32",
                   stride_w="i32", stride_dx="i32", scale="fp32", softcap="fp32", HAS_SOFTCAP="constexpr",
                   BLOCK_N="constexpr", BLOCK_V="constexpr", BLOCK_D="constexpr", UPCAST_DOT="constexpr",
                   DOT_PREC="constexpr"),
              dict(HAS_SOFTCAP=True, UPCAST_DOT=False, DOT_PREC="tf32", **tile))
    build("policy_ref-bf16", R._policy_ref_reward_kernel,
          dict(HP="*bf16", WP="*bf16", HR="*bf16", WR="*bf16", TGT="*i64", MASK="*u8", R="*fp32", PART="*fp32",
               ZT="*fp32", N="i32", V="i32", DP="i32", DR="i32", stride_hp="i32", stride_wp="i32", stride_hr="i32",
               stride_wr="i32", scale="fp32", softcap="fp32", beta="fp32", HAS_SOFTCAP="constexpr",
               HAS_MASK="constexpr", SPLITS="constexpr", BLOCK_N="constexpr", BLOCK_V="constexpr",
               BLOCK_D="constexpr", UPCAST_DOT="constexpr", DOT_PREC="constexpr"),
          dict(HAS_SOFTCAP=False, HAS_MASK=True, SPLITS=3, UPCAST_DOT=False, DOT_PREC="tf32", **tile))
    build("combine", L._linear_logprob_combine_kernel,
          dict(PART="*fp32", OUT="*fp32", LSE="*fp32", N="i32", SPLITS="constexpr", BLOCK="constexpr"),
          dict(SPLITS=3, BLOCK=1024), 4)
    build("policy_ref-combine", R._policy_ref_combine_kernel,
          dict(PART="*fp32", ZT="*fp32", MASK="*u8", R="*fp32", N="i32", beta="fp32", HAS_MASK="constexpr",
               SPLITS="constexpr", BLOCK="constexpr"), dict(HAS_MASK=True, SPLITS=3, BLOCK=1024), 4)
    build("token_reward-fwd", R._token_reward_fwd_kernel,
          dict(LP="*bf16", LPREF="*fp32", MASK="*u8", R="*fp32", N="i32", beta="fp32", HAS_REF="constexpr",
               HAS_MASK="constexpr", BLOCK="constexpr"), dict(HAS_REF=True, HAS_MASK=True, BLOCK=1024), 4)
    build("token_reward-bwd", R._token_reward_bwd_kernel,
          dict(G="*fp32", MASK="*fp32", DLP="*bf16", DLPREF="*fp16", N="i32", beta="fp32", HAS_REF="constexpr",
               HAS_MASK="constexpr", BLOCK="constexpr"), dict(HAS_REF=True, HAS_MASK=True, BLOCK=1024), 4)
    for op in range(5):
        build(f"segment_reduce-{op}", S._segment_reduce_kernel,
              dict(VALS="*bf16", CU="*i64", OUT="*fp32", OP="constexpr", BLOCK="constexpr"), dict(OP=op, BLOCK=1024), 4)
    build("segment_broadcast", S._segment_broadcast_kernel,
          dict(G="*fp32", CU="*i32", DV="*bf16", MEAN="constexpr", BLOCK="constexpr"), dict(MEAN=True, BLOCK=1024), 4)
    for rev in (False, True):
        build(f"segment_cumsum-{rev}", S._segment_cumsum_kernel,
              dict(VALS="*fp32", CU="*i32", OUT="*bf16", REVERSE="constexpr", BLOCK="constexpr"),
              dict(REVERSE=rev, BLOCK=1024), 4)
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


@pytest.mark.parametrize("name", ["fwd-bf16-s1", "fwd-bf16-s4", "fwd-fp16-s1", "dx-bf16", "dx-fp16", "policy_ref-bf16"])
def test_hot_kernels_use_wgmma_pipelined_without_spills(compiled, name):
    r = compiled[name]
    assert "error" not in r, r
    assert r["wgmma"] > 0, f"{name}: no Hopper wgmma in the PTX"
    assert r["cp_async"] > 0 and max(r["stages"], default=0) >= 2, f"{name}: D loop not software-pipelined: {r}"
    if "local" in r:
        assert r["local"] == 0 and r["stack"] == 0, f"{name}: register spills {r}"


if __name__ == "__main__":
    _compile_all()
