"""Fixtures for the search tests: tiny PRMs, and a tokenizer whose BPE merges run across the step delimiter."""

import random

import pytest


@pytest.fixture(scope="session")
def tiny_scorer(tiny_model_dir, tiny_ref_dir):
    from freeprm.engine import Scorer

    return Scorer(tiny_model_dir, tiny_ref_dir, prompt_format="raw")


@pytest.fixture(scope="session")
def merge_tokenizer():
    """Byte-level BPE without the whitespace pre-split: it learns tokens such as ``'.\\n\\nThe '`` that hold the end of
    one step, the delimiter and the start of the next."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["add", "sum", "is", "we", "so", "it", "one", "two", "next", "total", "then"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + f" {rng.randint(0, 99)}.\n\nThe "
              + " ".join(rng.choice(words) for _ in range(3)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def merge_scorer(merge_tokenizer):
    from freeprm.engine import Scorer
    from freeprm.testing import make_tiny_llama

    pol = make_tiny_llama(len(merge_tokenizer), seed=3)
    ref = make_tiny_llama(len(merge_tokenizer), seed=4)
    return Scorer((pol, merge_tokenizer), (ref, merge_tokenizer), prompt_format="raw", beta=0.5)
