"""Reference cache: stored values equal a fresh forward; a hit does no reference forward; a changed key recomputes."""

import pytest
import torch
from safetensors import safe_open

from freeprm.engine import load_model, sequence_logprobs
from freeprm.trainer import TrainConfig, ref_cache, train
from freeprm.trainer.data import build_items, collate, load_examples
from freeprm.trainer.ref_cache import ReferenceCache, model_fingerprint, sequence_key


def _cfg(tmp_path, **kw):
    return TrainConfig(lr=1e-3, max_steps=1, batch_size=4, progress=False, ref_cache_dir=str(tmp_path / "rc"), **kw)


def test_cached_values_equal_a_fresh_forward(tiny_model_dir, data_path, tmp_path):
    model, tok = load_model(tiny_model_dir)
    items, _ = build_items(tok, load_examples(data_path, "ce"), "ce")
    seqs = [it.seqs[0] for it in items]
    cache = ReferenceCache.for_model(tmp_path, model, tok)
    got = cache.get(seqs, model, max_batch_tokens=64)  # several length-sorted batches
    assert cache.computed == len(seqs) and cache.path.is_file()
    b = collate(seqs, pad_id=tok.pad_token_id)
    with torch.no_grad():
        lp = sequence_logprobs(model, b.input_ids, b.attention_mask, b.target_mask)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(got[i], lp[i, s.response_start:len(s.input_ids)], rtol=1e-5, atol=1e-5)
    with safe_open(str(cache.path), "pt") as f:
        meta = f.metadata()
        assert meta["model"] == model_fingerprint(model) and sequence_key(seqs[0]) in f.keys()
    again = ReferenceCache.for_model(tmp_path, model, tok)
    assert all(torch.equal(a, b) for a, b in zip(again.get(seqs, None), got)) and again.computed == 0


def test_training_run_hits_cache_without_reference_forward(tiny_model_dir, data_path, tmp_path, monkeypatch):
    first = train(tiny_model_dir, data_path, tmp_path / "a", config=_cfg(tmp_path))
    assert first.ref_computed == 16

    def boom(*a, **k):
        raise AssertionError("reference forward on a cache hit")

    monkeypatch.setattr(ref_cache, "compute_ref_logprobs", boom)
    second = train(tiny_model_dir, data_path, tmp_path / "b", config=_cfg(tmp_path))
    assert second.ref_computed == 0 and second.ref_cache == first.ref_cache
    assert second.metrics[0]["loss"] == pytest.approx(first.metrics[0]["loss"], rel=1e-6)
    # the same weights stored elsewhere share the cache: the key is the weights, not the path
    model, tok = load_model(tiny_model_dir)
    moved = tmp_path / "copy"
    model.save_pretrained(moved)
    tok.save_pretrained(moved)
    assert train(str(moved), data_path, tmp_path / "c", config=_cfg(tmp_path)).ref_computed == 0


def test_changed_key_recomputes(tiny_model_dir, tiny_ref_dir, data_path, tmp_path, rows_file):
    base = train(tiny_model_dir, data_path, tmp_path / "a", config=_cfg(tmp_path))
    # new rows: only their sequences are computed, the old ones stay in the same file
    more = rows_file(tmp_path / "more.jsonl", 9)
    grown = train(tiny_model_dir, more, tmp_path / "b", config=_cfg(tmp_path))
    assert grown.ref_computed == 2 and grown.ref_cache == base.ref_cache
    # other weights: another key, another file, everything recomputed
    other = tiny_ref_dir  # seed 1, the same tokenizer
    changed = train(other, data_path, tmp_path / "c", config=_cfg(tmp_path))
    assert changed.ref_computed == 16 and changed.ref_cache != base.ref_cache
    # an explicit reference model (not the policy) has its own key too
    explicit = train(tiny_model_dir, data_path, tmp_path / "d", config=_cfg(tmp_path), reference=other)
    assert explicit.ref_computed == 0 and explicit.ref_cache == changed.ref_cache
    # a lost cache file is rebuilt
    base.ref_cache.unlink()
    assert train(tiny_model_dir, data_path, tmp_path / "e", config=_cfg(tmp_path)).ref_computed == 16
