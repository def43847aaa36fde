"""Segmented reductions (step sums, Q cumsums, per-response min/max/last/mean/sum), fwd and bwd.

Budget: max|impl - oracle| <= 2 * max|torch_in_dtype - oracle| + atol, oracle in fp64.
Offsets include empty and one-token segments, leading/trailing empties and one long segment
(longer than the kernel's 1024-value chunk).
"""

import pytest
import torch

from freeprm.kernels import oracle as oracle_ops
from freeprm.kernels import segment_cumsum, segment_reduce, segment_sum

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float16]

LENGTHS = {
    "mixed": [0, 3, 1, 0, 7, 1, 12, 0],  # empty, one-token, empties at both ends
    "long": [1500, 2, 0, 1],  # spans two 1024-value chunks
    "single": [5],
}


def _cu(lengths, device, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=device)


def _values(n, dtype, device, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g)
    if ties:
        v = v.round()  # many ties, exercising min/max gradient splitting
    return v.to(dtype).to(device)


def three_way(fn_impl, fn_ref, values, cu, grad_seed=7):
    """[out, d_values] for the fp64 oracle, torch in dtype, and the implementation."""
    res = []
    for cast, fn in ((lambda x: x.double(), fn_ref), (lambda x: x.clone(), fn_ref), (lambda x: x.clone(), fn_impl)):
        v = cast(values).requires_grad_()
        out = fn(v, cu)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device)
        ok = ~out.detach().isnan()
        loss = (out * g.to(out.dtype))[ok].sum()  # NaN (empty) segments carry no gradient
        (dv,) = torch.autograd.grad(loss, v, allow_unused=True)
        res.append([out.detach(), torch.zeros_like(v) if dv is None else dv])
    return res


@pytest.mark.parametrize("layout", list(LENGTHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_segment_sum_and_cumsum(impl, dtype, layout, device, assert_budget):
    cu = _cu(LENGTHS[layout], device)
    values = _values(int(cu[-1]), dtype, device)
    for name, op, ref in (("sum", segment_sum, oracle_ops.segment_sum), ("cumsum", segment_cumsum, oracle_ops.segment_cumsum)):
        oracle, naive, got = three_way(lambda v, c: op(v, c, impl=impl), lambda v, c: ref(v, c, upcast=False), values, cu)
        assert got[0].dtype == torch.float32
        assert got[1].dtype == dtype
        for part, a, o, t in zip(("out", "grad"), got, oracle, naive):
            assert_budget(f"{impl} {name} {part}", a, o, t, ATOL[dtype])
    if layout == "mixed":
        assert (segment_sum(values, cu, impl=impl)[torch.tensor(LENGTHS[layout], device=device) == 0] == 0).all()


@pytest.mark.parametrize("op", list(oracle_ops.SEGMENT_OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_segment_reduce(impl, dtype, op, device, assert_budget):
    for layout in ("mixed", "long"):
        cu = _cu(LENGTHS[layout], device, torch.int32)
        values = _values(int(cu[-1]), dtype, device, ties=op in ("min", "max"))
        oracle, naive, got = three_way(lambda v, c: segment_reduce(v, c, op, impl=impl),
                                       lambda v, c: oracle_ops.segment_reduce(v, c, op, upcast=False), values, cu)
        assert got[0].shape == (len(cu) - 1,) and got[0].dtype == torch.float32
        empty = torch.tensor(LENGTHS[layout], device=device) == 0
        if op == "sum":
            assert (got[0][empty] == 0).all()
        else:
            assert got[0][empty].isnan().all() and not got[0][~empty].isnan().any()
        for part, a, o, t in zip(("out", "grad"), got, oracle, naive):
            assert_budget(f"{impl} {op} {part} ({layout})", a, o, t, ATOL[dtype])


def test_segment_no_segments_and_no_values(device):
    cu0 = torch.zeros(1, dtype=torch.int64, device=device)
    empty = torch.zeros(0, device=device)
    for impl in ("triton", "torch"):
        assert segment_sum(empty, cu0, impl=impl).shape == (0,)
        assert segment_cumsum(empty, cu0, impl=impl).shape == (0,)
        assert segment_reduce(empty, cu0, "max", impl=impl).shape == (0,)
    cu = torch.tensor([0, 0, 0], device=device)
    torch.testing.assert_close(segment_sum(empty, cu, impl="triton"), torch.zeros(2, device=device))
    assert segment_reduce(empty, cu, "mean", impl="triton").isnan().all()


def test_segment_errors(device):
    v = torch.randn(6)
    with pytest.raises(ValueError, match="op must be"):
        segment_reduce(v, _cu([6], device), "median")
    with pytest.raises(ValueError, match="1-D int32/int64"):
        segment_sum(v, _cu([6], device).float())
    with pytest.raises(ValueError, match="start at 0 and end"):
        segment_sum(v, torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match="start at 0 and end"):
        segment_cumsum(v, torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="non-decreasing"):
        segment_reduce(v, torch.tensor([0, 4, 2, 6]), "sum")
    with pytest.raises(ValueError, match="impl must be"):
        segment_sum(v, _cu([6], device), impl="gpu")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_segment_values_must_be_1d(impl, device):
    # a [B, T] tensor was flattened by the Triton path and rejected with an unclear error by the torch path
    v2 = torch.randn(2, 3, device=device)
    cu = _cu([6], device)
    for call in (lambda: segment_sum(v2, cu, impl=impl), lambda: segment_cumsum(v2, cu, impl=impl),
                 lambda: segment_reduce(v2, cu, "last", impl=impl),
                 lambda: segment_sum(torch.tensor(1.0, device=device), _cu([], device), impl=impl)):
        with pytest.raises(ValueError, match="values must be 1-D"):
            call()


@pytest.mark.parametrize("lengths", [[0, 2, 0, 0, 3, 1, 0], [0, 0], [1], [4, 0]], ids=str)
def test_segment_last_gradient(lengths, device):
    # g_k lands on the last value of each non-empty segment; empty segments (leading, repeated, trailing) add nothing
    cu = _cu(lengths, device)
    values = _values(int(cu[-1]), torch.float32, device, seed=2).requires_grad_()
    grad = torch.randn(len(lengths), device=device)
    (dv,) = torch.autograd.grad(segment_reduce(values, cu, "last", impl="triton"), values, grad)
    want = torch.zeros_like(dv)
    for k, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if b > a:
            want[b - 1] = grad[k]
    assert torch.equal(dv, want)


@pytest.mark.gpu
def test_segment_last_backward_does_not_sync():
    # boolean-mask indexing (dv[idx[nonempty]] = ...) needs the mask's count on the host: a stream sync
    cu = _cu([0, 2, 0, 3, 1, 0], "cuda")
    values = _values(6, torch.float32, "cuda").requires_grad_()
    out = segment_reduce(values, cu, "last", impl="triton", validate=False)
    grad = torch.randn(6, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (dv,) = torch.autograd.grad(out, values, grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = torch.zeros(6, device="cuda")
    want[1], want[4], want[5] = grad[1], grad[3], grad[4]  # the last values of the segments of lengths 2, 3, 1
    assert torch.equal(dv, want)


def test_segment_bf16_gradients_round_to_nearest(device):
    # the fp32 -> bf16 stores of the cumsum / sum / mean backward round to nearest (the interpreter truncated)
    cu = _cu(LENGTHS["long"] + LENGTHS["mixed"], device)
    n, k = int(cu[-1]), len(cu) - 1
    values = _values(n, torch.bfloat16, device).requires_grad_()
    g = torch.Generator().manual_seed(5)
    grad_q, grad_k = torch.randn(n, generator=g).to(device), torch.randn(k, generator=g).to(device)
    (dq,) = torch.autograd.grad(segment_cumsum(values, cu, impl="triton"), values, grad_q)
    exact = oracle_ops.segment_cumsum(grad_q.double().flip(0), (cu[-1] - cu).flip(0), upcast=False).flip(0)
    assert ((dq.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6).all()  # RN: <= 2^-8 relative (+ fp32 sums)
    lengths = (cu[1:] - cu[:-1]).double()
    for op, per_seg in (("sum", grad_k.double()), ("mean", grad_k.double() / lengths.clamp(min=1))):
        (dv,) = torch.autograd.grad(segment_reduce(values, cu, op, impl="triton"), values, grad_k)
        assert torch.equal(dv, per_seg.repeat_interleave((cu[1:] - cu[:-1]).long()).float().bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(oracle_ops.SEGMENT_OPS))
def test_segment_reduce_gpu_bf16(op, assert_budget):
    lengths = torch.randint(0, 40, (2000,)).tolist()
    cu = _cu(lengths, "cuda")
    values = torch.randn(int(cu[-1]), device="cuda").to(torch.bfloat16)
    oracle = oracle_ops.segment_reduce(values.double(), cu, op, upcast=False)
    naive = oracle_ops.segment_reduce(values, cu, op, upcast=False)
    assert_budget(op, segment_reduce(values, cu, op, impl="triton"), oracle, naive, 2e-2)
    q = segment_cumsum(values, cu, impl="triton")
    assert_budget("cumsum", q, oracle_ops.segment_cumsum(values.double(), cu, upcast=False),
                  oracle_ops.segment_cumsum(values, cu, upcast=False), 2e-2)
