"""Data: row parsing, bad rows with line numbers, automatic pairing, tokenization and truncation."""

import json

import pytest
import torch

from freeprm.trainer.data import Labeled, Pair, build_items, collate, load_examples, pair_labeled, read_jsonl


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"prompt": "q", "response": "a", "label": 1})


@pytest.mark.parametrize("bad,match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"response": "a", "label": 1}), "missing 'prompt'"),
    (json.dumps({"prompt": "q", "response": "a"}), "missing 'label'"),
    (json.dumps({"prompt": "q", "label": 1}), "missing 'response'"),
    (json.dumps({"prompt": "q", "response": "a", "label": 2}), "'label' must be"),
    (json.dumps({"prompt": "q", "response": "a", "label": "yes"}), "'label' must be"),
    (json.dumps({"prompt": "q", "response": 5, "label": 1}), "'response' must be a string"),
    (json.dumps({"prompt": "q", "response": "  ", "label": 0}), "'response' is empty"),
    (json.dumps({"prompt": "q", "chosen": "a"}), "'rejected' is missing"),
])
def test_bad_row_reports_its_line(tmp_path, bad, match):
    p = _write(tmp_path, [GOOD, "", GOOD, bad, GOOD])  # blank line 2 is skipped but counted
    with pytest.raises(ValueError, match=match) as e:
        read_jsonl(p)
    assert f"{p}:4:" in str(e.value)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no rows"):
        read_jsonl(_write(tmp_path, ["", "  "]))


def test_kto_needs_binary_labels(tmp_path):
    p = _write(tmp_path, [GOOD, json.dumps({"prompt": "q", "response": "b", "label": 0.5})])
    assert [e.label for e in load_examples(p, "ce")] == [1.0, 0.5]  # soft labels are fine for CE
    with pytest.raises(ValueError, match=":2: KTO needs labels 0 or 1"):
        load_examples(p, "kto")


def test_pairs_and_auto_pairing(tmp_path):
    rows = [{"prompt": "p1", "response": f"c{i}", "label": 1} for i in range(3)]
    rows += [{"prompt": "p1", "response": f"w{i}", "label": 0} for i in range(2)]
    rows += [{"prompt": "p2", "response": "only correct", "label": True}]
    rows += [{"prompt": "p3", "chosen": "good", "rejected": "bad"}]
    p = _write(tmp_path, [json.dumps(r) for r in rows])
    pairs = load_examples(p, "dpo", seed=1)
    assert all(isinstance(x, Pair) for x in pairs)
    p1 = [x for x in pairs if x.prompt == "p1"]
    assert len(p1) == 2  # min(3 correct, 2 incorrect); p2 has no incorrect response: no pair
    assert all(x.chosen.startswith("c") and x.rejected.startswith("w") for x in p1)
    assert len({x.rejected for x in p1}) == 2 and len({x.chosen for x in p1}) == 2  # each used once
    assert ("good", "bad") in [(x.chosen, x.rejected) for x in pairs if x.prompt == "p3"]
    labeled = load_examples(p, "ce")  # pair rows unfold into a correct and an incorrect response
    assert [(x.response, x.label) for x in labeled if x.prompt == "p3"] == [("good", 1.0), ("bad", 0.0)]
    with pytest.raises(ValueError, match="no pairs"):
        load_examples(_write(tmp_path, [GOOD]), "nca")
    with pytest.raises(ValueError, match="labels 0 or 1"):
        pair_labeled([Labeled("q", "a", 0.5, 3)])


def test_tokenization_matches_engine_and_truncates(tiny_model_dir):
    from transformers import AutoTokenizer

    from freeprm.engine.tokenization import encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = [Labeled("What is 3 + 4?", "3 + 4 = 7.\nThe answer is 7.", 1.0, 1)]
    items, n_trunc = build_items(tok, ex, "ce", max_length=1024)
    enc = encode(tok, ex[0].prompt, ex[0].response)
    assert items[0].seqs[0].input_ids == tuple(enc.input_ids) and items[0].seqs[0].response_start == enc.response_start
    assert n_trunc == 0
    short, n_trunc = build_items(tok, ex, "ce", max_length=enc.response_start + 3)
    assert n_trunc == 1 and short[0].seqs[0].n_response == 3
    with pytest.raises(ValueError, match="line 1: the prompt alone"):
        build_items(tok, ex, "ce", max_length=enc.response_start)
    # KTO items carry a mismatched sequence: own prompt, another prompt's response
    ex2 = ex + [Labeled("What is 5 + 6?", "5 + 6 = 11.", 0.0, 2)]
    kto, _ = build_items(tok, ex2, "kto", max_length=1024)
    assert kto[0].seqs[1].input_ids == tuple(encode(tok, ex2[0].prompt, ex2[1].response).input_ids)
    with pytest.raises(ValueError, match="two distinct prompts"):
        build_items(tok, ex, "kto")


def test_collate_right_pads_and_masks():
    from freeprm.trainer.data import Seq

    seqs = [Seq((5, 6, 7, 8), 2), Seq((9, 10, 11), 1)]
    ref = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0])]
    b = collate(seqs, pad_id=0, ref=ref)
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b.target_mask.tolist() == [[False, False, True, True], [False, True, True, False]]
    assert b.ref_logps.tolist() == [[0, 0, -1, -2], [0, -3, -4, 0]]
    with pytest.raises(ValueError, match="stale"):
        collate(seqs, 0, ref=[torch.zeros(3), torch.zeros(2)])
