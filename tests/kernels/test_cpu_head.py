"""The CPU path of linear_logprobs: the C++ tile kernels (forward and backward) and the pure-torch fallback,
each against an fp64 oracle, on tiles that do not divide the shapes, with soft-cap / logit scale."""

import shutil

import pytest
import torch

from freeprm.kernels import chunked, cpu_ext, linear_logprobs
from freeprm.kernels import oracle as oracle_ops

PATHS = ["cpp", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Forces one path; small tiles so every shape below spans many row and vocab blocks, forward and backward."""
    monkeypatch.setattr(chunked, "FWD_ROWS", 8)
    monkeypatch.setattr(chunked, "FWD_TILE_ELEMS", 8 * 96)  # 8-row x 96-column tiles
    monkeypatch.setattr(chunked, "TORCH_FWD_ROWS", 8)
    monkeypatch.setattr(chunked, "TORCH_FWD_TILE_ELEMS", 8 * 96)
    monkeypatch.setattr(chunked, "BWD_ROWS", 8)
    monkeypatch.setattr(chunked, "BWD_COLS", 96)
    monkeypatch.setattr(chunked, "MIN_VOCAB_BLOCK", 96)  # torch backward: 16-row chunks x 96-wide blocks
    monkeypatch.setattr(chunked, "TILE_BYTES", 4 * 16 * 96)
    if request.param == "cpp":
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler: the C++ kernel cannot be built here")
        if cpu_ext.get() is None:
            pytest.fail("a C++ compiler is present but the C++ CPU kernel did not build (see the warning)")
        monkeypatch.setattr(chunked, "USE_EXT", True)
    else:
        monkeypatch.setattr(chunked, "USE_EXT", False)
    return request.param


def _inputs(n, v, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    edges = torch.tensor([0, 95, 96, v - 1]).clamp(max=v - 1)  # tile edges and the last entry
    targets[: min(n, 4)] = edges[: min(n, 4)]
    return hidden, weight, targets


@pytest.mark.parametrize("n,v", [(37, 1000), (8, 96), (1, 97), (64, 2000)])
@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.7}, {"logit_scale": 1.3, "softcap": 3.0}])
def test_forward_matches_oracle(path, n, v, transform):
    hidden, weight, targets = _inputs(n, v, 64)
    oracle = oracle_ops.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False, **transform)
    plain = oracle_ops.linear_logprobs(hidden, weight, targets, upcast=False, **transform)
    ours = linear_logprobs(hidden, weight, targets, impl="torch", **transform)
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    assert ((ours.double() - oracle).abs() <= 2 * (plain.double() - oracle).abs() + 1e-5).all()


def test_lse_and_target_logits_separately(path):
    hidden, weight, targets = _inputs(37, 1000, 64)
    z = hidden.double() @ weight.double().T * 0.7
    z = 3.0 * torch.tanh(z / 3.0)
    logp, lse = chunked.chunked_linear_logprobs_fwd(hidden, weight, targets, 0.7, 3.0)
    assert torch.allclose(lse.double(), z.logsumexp(-1), atol=1e-5, rtol=0)
    assert torch.allclose((logp + lse).double(), z.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0)


def test_extreme_logits_stay_finite(path):
    """Large logits (|z| ~ 1e3) in different vocab blocks: the per-block maxima must be merged stably."""
    hidden, weight, targets = _inputs(16, 500, 32)
    weight[300] *= 200.0
    out = linear_logprobs(hidden, weight, targets, impl="torch")
    oracle = oracle_ops.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, oracle, atol=1e-3, rtol=1e-5)


def _grads(fn, h, w, g, need=(True, True)):
    h, w = h.clone().requires_grad_(need[0]), w.clone().requires_grad_(need[1])
    out = fn(h, w)
    wrt = [x for x in (h, w) if x.requires_grad]
    grads = torch.autograd.grad((out * g.to(out.dtype)).sum(), wrt)
    return [out.detach().double()] + [x.double() for x in grads]


def _check_grads(transform, n, v, d=64, need=(True, True), chunk_rows=None, seed=1):
    hidden, weight, targets = _inputs(n, v, d, seed=seed)
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))  # never ones: exercises g != 1
    ref = lambda h, w: oracle_ops.linear_logprobs(h, w, targets, upcast=False, **transform)  # noqa: E731
    oracle = _grads(ref, hidden.double(), weight.double(), g, need)
    plain = _grads(ref, hidden, weight, g, need)
    ours = _grads(lambda h, w: linear_logprobs(h, w, targets, impl="torch", chunk_rows=chunk_rows, **transform),
                  hidden, weight, g, need)
    assert len(ours) == 1 + sum(need)
    for o, p, k in zip(oracle, plain, ours):
        assert ((k - o).abs() <= 2 * (p - o).abs() + 1e-5 * max(1.0, float(o.abs().max()))).all(), (k - o).abs().max()


@pytest.mark.parametrize("n,v", [(37, 1000), (64, 960)], ids=["ragged", "aligned"])
@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.7}, {"logit_scale": 0.7, "softcap": 3.0}])
def test_grads_with_random_grad_output(path, transform, n, v):
    _check_grads(transform, n, v)


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["hidden_only", "weight_only"])
def test_grads_of_one_input(path, need):
    _check_grads({"logit_scale": 1.3, "softcap": 3.0}, 37, 1000, need=need)


def test_grads_over_several_row_chunks(path):
    """chunk_rows below N: the C++ backward runs one parallel region per chunk (d_weight accumulates across
    them, the d_hidden partials are cleared per chunk); the torch backward uses it as its row chunk."""
    _check_grads({"logit_scale": 0.7}, 45, 700, d=80, chunk_rows=16)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("v", [1000, 150], ids=["11_blocks", "2_blocks"])
def test_grads_multithreaded(path, threads, v):
    """Several workers (the suite runs single-threaded): d_hidden partials summed, each d_weight block written by
    one worker; V = 150 is two 96-wide blocks, so with 3 threads one worker gets none."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_grads({"logit_scale": 0.7, "softcap": 3.0}, 29, v, d=32)
        _check_grads({}, 45, v, d=32, chunk_rows=16)
    finally:
        torch.set_num_threads(old)


def test_fp16_inputs_take_the_torch_path_and_match(path):
    hidden, weight, targets = _inputs(37, 1000, 64, dtype=torch.float16)
    oracle = oracle_ops.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
    plain = oracle_ops.linear_logprobs(hidden, weight, targets, upcast=False)
    ours = linear_logprobs(hidden, weight, targets, impl="torch")
    assert ((ours.double() - oracle).abs() <= 2 * (plain.double() - oracle).abs() + 1e-4).all()


def test_cpp_and_torch_paths_agree(monkeypatch):
    if cpu_ext.get() is None:
        pytest.skip("C++ CPU kernel unavailable")
    hidden, weight, targets = _inputs(100, 3000, 48)
    outs = []
    for use in (True, False):
        monkeypatch.setattr(chunked, "USE_EXT", use)
        outs.append(chunked.chunked_linear_logprobs_fwd(hidden, weight, targets, 1.0, 30.0))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=2e-5, rtol=0)


def test_env_var_disables_the_cpp_kernel(monkeypatch):
    monkeypatch.setenv("FREEPRM_CPU_EXT", "0")
    assert cpu_ext.get() is None
    hidden, weight, targets = _inputs(5, 200, 16)
    oracle = oracle_ops.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
    assert torch.allclose(linear_logprobs(hidden, weight, targets, impl="torch"), oracle, atol=1e-5)


def test_zero_rows(path):
    out = linear_logprobs(torch.zeros(0, 16), torch.randn(50, 16), torch.zeros(0, dtype=torch.long), impl="torch")
    assert out.shape == (0,)


@pytest.mark.parametrize("threads", [2, 3])
def test_cpp_kernel_multithreaded_under_autograd(path, threads):
    """Worker threads do not inherit the caller's no-grad mode: the forward inside autograd must still work."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hidden, weight, targets = _inputs(50, 700, 32)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_logprobs(h, w, targets, impl="torch", logit_scale=0.5)
        out.sum().backward()
        oracle = oracle_ops.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False, logit_scale=0.5)
        assert torch.allclose(out.detach(), oracle, atol=1e-5)
        assert h.grad is not None and w.grad is not None
    finally:
        torch.set_num_threads(old)


def test_strided_targets_hidden_weight(path):
    """Non-contiguous inputs (targets with stride 2, padded hidden rows, transposed weight)."""
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 700, (29, 2), generator=g)[:, 0]
    hidden = torch.randn(29, 40, generator=g)[:, :32]
    weight = (torch.randn(32, 700, generator=g) * 0.3).T
    oracle = oracle_ops.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
    assert torch.allclose(linear_logprobs(hidden, weight, targets, impl="torch"), oracle, atol=1e-5)


def test_stale_build_lock_from_a_killed_builder_does_not_hang():
    """A process killed mid-build (kill -9) leaves torch's ``lock`` file; the next load must not wait forever."""
    import subprocess
    import sys

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the C++ kernel cannot be built here")
    if cpu_ext.get() is None:
        pytest.fail("a C++ compiler is present but the C++ CPU kernel did not build (see the warning)")
    lock = cpu_ext.build_dir() / "lock"
    lock.touch()  # what a builder killed between torch's lock and unlock leaves behind
    code = "from freeprm.kernels import cpu_ext; import sys; sys.exit(0 if cpu_ext.get() is not None else 3)"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=240)
    finally:
        lock.unlink(missing_ok=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]


def test_cpu_ext_builds_from_a_copy_in_its_build_folder():
    # checkouts at other paths (git worktrees) with the same source must reuse one build: the source path in
    # build.ninja was the checkout's, so each worktree's first load rebuilt the shared copy (~45 s, under a lock)
    if cpu_ext.get() is None:
        pytest.skip("the C++ kernel is not built here")
    build = cpu_ext.build_dir()
    ninja = (build / "build.ninja").read_text()
    assert str(build / "cpu_head.cpp") in ninja and str(cpu_ext._SRC) not in ninja
    assert (build / "cpu_head.cpp").read_bytes() == cpu_ext._SRC.read_bytes()
