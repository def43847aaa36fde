"""The CPU forward of linear_logprobs: the C++ tile kernel and the pure-torch fallback, each against an
fp64 oracle, on tiles that do not divide the shapes, with soft-cap / logit scale, and through backward."""

import shutil

import pytest
import torch

from freeprm.kernels import chunked, cpu_ext, linear_logprobs, reference

PATHS = ["cpp", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Forces one forward path; small tiles so every shape below spans many row and vocab blocks."""
    monkeypatch.setattr(chunked, "FWD_ROWS", 8)
    monkeypatch.setattr(chunked, "FWD_TILE_ELEMS", 8 * 96)  # 8-row x 96-column tiles
    monkeypatch.setattr(chunked, "TORCH_FWD_ROWS", 8)
    monkeypatch.setattr(chunked, "TORCH_FWD_TILE_ELEMS", 8 * 96)
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
    oracle = reference.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False, **transform)
    plain = reference.linear_logprobs(hidden, weight, targets, upcast=False, **transform)
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
    oracle = reference.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, oracle, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.7, "softcap": 3.0}])
def test_grads_with_random_grad_output(path, transform):
    hidden, weight, targets = _inputs(37, 1000, 64, seed=1)
    g = torch.randn(37, generator=torch.Generator().manual_seed(2))

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(h, w)
        dh, dw = torch.autograd.grad((out * g.to(out.dtype)).sum(), (h, w))
        return out.double(), dh.double(), dw.double()

    oracle = run(lambda h, w: reference.linear_logprobs(h, w, targets, upcast=False, **transform),
                 hidden.double(), weight.double())
    plain = run(lambda h, w: reference.linear_logprobs(h, w, targets, upcast=False, **transform), hidden, weight)
    ours = run(lambda h, w: linear_logprobs(h, w, targets, impl="torch", **transform), hidden, weight)
    for o, p, k in zip(oracle, plain, ours):
        assert ((k - o).abs() <= 2 * (p - o).abs() + 1e-5).all(), (k - o).abs().max()


def test_fp16_inputs_take_the_torch_path_and_match(path):
    hidden, weight, targets = _inputs(37, 1000, 64, dtype=torch.float16)
    oracle = reference.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
    plain = reference.linear_logprobs(hidden, weight, targets, upcast=False)
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
    oracle = reference.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
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
        oracle = reference.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False, logit_scale=0.5)
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
    oracle = reference.linear_logprobs(hidden.double(), weight.double(), targets, upcast=False)
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
