"""GSM8K step cleaning and corruption (freeprm/gsm8k.py)."""

import random
import re

from freeprm.gsm8k import _eval, corrupt_steps, final_answer, gold_steps, read_gsm8k

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_gold_steps_strip_annotations():
    assert gold_steps(SOLUTION) == ["Natalia sold 48/2 = 24 clips in May.",
                                    "Natalia sold 48+24 = 72 clips altogether in April and May.", "The answer is 72."]
    assert final_answer("x\n#### 1,234") == "1234"


def test_corruption_propagates_to_the_answer():
    for seed in range(5):
        c = corrupt_steps(QUESTION, SOLUTION, random.Random(seed))
        assert c is not None and c.answer != "72"
        gold = gold_steps(SOLUTION)
        assert c.steps[:c.step_index] == gold[:c.step_index]  # steps before the corruption are unchanged
        assert c.steps[c.step_index] != gold[c.step_index]
        assert c.steps[-1] == f"The answer is {c.answer}."
        if c.step_index == 0:  # the wrong 24 flows into the second calculation
            wrong = re.search(r"= (\d+) clips in May", c.steps[0]).group(1)
            assert c.steps[1].startswith(f"Natalia sold 48+{wrong} = {48 + int(wrong)}")


def test_question_numbers_are_never_remapped():
    # the first result, 48, is also a number of the question: only the second line may be corrupted
    sol = "Half is 96/2 = <<96/2=48>>48.\nThen 48+1 = <<48+1=49>>49.\n#### 49"
    for seed in range(5):
        c = corrupt_steps("She had 48 apples and 96 pears.", sol, random.Random(seed))
        assert c is not None and c.step_index == 1
        assert c.steps[0] == "Half is 96/2 = 48." and c.steps[1].startswith("Then 48+1 = ")
        assert c.answer != "49"


def test_no_annotation_no_corruption():
    assert corrupt_steps("q", "She had 3 apples.\n#### 3", random.Random(0)) is None


def test_safe_eval_refuses_code():
    assert _eval("2*(3+4)/7") == 2.0
    assert _eval("__import__('os')") is None
    assert _eval("2**100") is None
    assert _eval("1/0") is None


def test_real_test_split_mostly_corruptible(shared_data):
    shared_data("gsm8k_test.jsonl")
    recs = read_gsm8k("test", limit=100)
    rng = random.Random(0)
    made = [corrupt_steps(r["question"], r["answer"], rng) for r in recs]
    ok = [(r, c) for r, c in zip(recs, made) if c is not None]
    assert len(ok) >= 50
    for r, c in ok:
        assert c.answer != final_answer(r["answer"])
        assert len(c.steps) == len(gold_steps(r["answer"]))
