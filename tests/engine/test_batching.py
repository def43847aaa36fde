"""freeprm.engine.batching: padding on either side, target masks, length buckets, the pad-id fallback."""

import random
from types import SimpleNamespace

import pytest
import torch

from freeprm.engine.batching import length_batches, pad_batch, pad_id_of

SEQS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
STARTS = [1, 0, 3, 2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_places_tokens_and_masks(side):
    pb = pad_batch(SEQS, -1, side=side, target_starts=STARTS)
    assert pb.input_ids.shape == pb.attention_mask.shape == pb.target_mask.shape == (4, 5)
    for b, s in enumerate(SEQS):
        n = len(s)
        cols = list(range(5 - n, 5)) if side == "left" else list(range(n))
        assert pb.offsets[b] == cols[0] and pb.lengths[b] == n
        assert pb.input_ids[b, cols].tolist() == s
        pad_cols = [c for c in range(5) if c not in cols]
        assert pb.input_ids[b, pad_cols].tolist() == [-1] * len(pad_cols)
        assert pb.attention_mask[b].tolist() == [int(c in cols) for c in range(5)]
        assert pb.target_mask[b].tolist() == [c in cols[STARTS[b]:] for c in range(5)]
        assert pb.unpad(pb.input_ids, b, STARTS[b]).tolist() == s[STARTS[b]:]
    assert pb.target_mask.dtype == torch.bool and pb.attention_mask.dtype == torch.long


def test_pad_batch_target_ends_length_and_errors():
    pb = pad_batch(SEQS, 0, target_starts=[0, 0, 1, 0], target_ends=[2, 1, 4, 1], length=7)
    assert pb.input_ids.shape == (4, 7)
    assert pb.target_mask.sum(1).tolist() == [2, 1, 3, 1]
    assert pad_batch(SEQS, 0).target_mask.sum() == 0  # no target_starts: no targets
    with pytest.raises(ValueError, match="side"):
        pad_batch(SEQS, 0, side="middle")
    with pytest.raises(ValueError, match="empty"):
        pad_batch([[1], []], 0)
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([], 0)
    with pytest.raises(ValueError, match="outside"):
        pad_batch(SEQS, 0, target_starts=[4, 0, 0, 0])
    with pytest.raises(ValueError, match="shorter"):
        pad_batch(SEQS, 0, length=3)
    with pytest.raises(ValueError, match="entries"):
        pad_batch(SEQS, 0, target_starts=[0])


def test_pad_id_fallback():
    assert pad_id_of(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=[7, 8])) == 7
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id_of(SimpleNamespace(pad_token_id=0, eos_token_id=5)) == 0  # 0 is a real pad id, not "missing"


def test_length_batches_budget_order_and_cover():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)] + [500]  # one row longer than the budget
    batches = length_batches(lengths, 256)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert batches[0] == [200]  # the over-budget row alone, first
    for b in batches[1:]:
        assert len(b) * max(lengths[i] for i in b) <= 256
    # longest first across and within batches; a greedy fill: the next row would not have fit
    seq = [lengths[i] for i in flat]
    assert seq == sorted(seq, reverse=True)
    for b, _nxt in zip(batches[1:], batches[2:]):
        assert (len(b) + 1) * lengths[b[0]] > 256
    assert all(len(b) <= 3 for b in length_batches(lengths, 10**6, max_batch_size=3))
    with pytest.raises(ValueError):
        length_batches(lengths, 0)
    assert length_batches([], 10) == []


def test_pack_batch_layout_positions_and_mask():
    from freeprm.engine.batching import pack_batch, pack_rows

    bins = pack_rows([5, 3, 2, 1, 4], 5)
    assert sorted(i for b in bins for i in b) == list(range(5))
    assert all(sum([5, 3, 2, 1, 4][i] for i in b) <= 5 for b in bins) and len(bins) == 3
    pk = pack_batch(SEQS, 0, target_starts=STARTS)
    for i, s in enumerate(SEQS):
        assert pk.unpack(pk.input_ids, i).tolist() == s
        assert pk.unpack(pk.position_ids, i).tolist() == list(range(len(s)))
        assert pk.unpack(pk.target_mask, i).tolist() == [j >= STARTS[i] for j in range(len(s))]
    m = pk.attention_mask_4d()[:, 0] == 0  # [R, T, T] allowed
    for i, s in enumerate(SEQS):
        r, a, n = pk.rows[i], pk.starts[i], len(s)
        for q in range(a, a + n):
            assert m[r, q].nonzero().flatten().tolist() == list(range(a, q + 1))  # causal, own sequence only
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([6], 5)
