"""Tiny random models and tokenizers for tests, demos and benchmarks (no hub access needed).

``make_tiny_model_dir(path)`` writes a Hugging Face directory (config.json, model.safetensors,
tokenizer files) holding a small random Llama and a byte-level BPE tokenizer trained on the fly,
with a chat template, so every engine code path (loading, chat formatting, offsets) runs on it.
``naive_sequence_logprobs`` is the full-logits oracle the tests and benchmarks compare against.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Step 1: In May she sold 48 / 2 = 24 clips.\n\nStep 2: Altogether she sold 48 + 24 = 72 clips.",
    "The answer is 72. #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Let x be the number. Then 3x + 5 = 20, so x = 5. \\boxed{5}",
    "Café naïve résumé — 数学 問題 ∑ π ≈ 3.14159; emojis 🙂 too.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 + - * / = ( ) . , ; : ? !",
    "user assistant system <|im_start|> <|im_end|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (BOS added, chat template set), trained in ~0.1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int, *, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                    tie_word_embeddings: bool = False, scale: float = 1.0, **config_kwargs):
    """A small random ``LlamaForCausalLM`` in float32 (``scale`` multiplies the init std)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.02 * scale, bos_token_id=None, eos_token_id=None, pad_token_id=None, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # larger logits than the default init, so log-probs are far from uniform
        model.lm_head.weight.mul_(20.0)
    return model


def make_tiny_model_dir(path: str | os.PathLike, *, seed: int = 0, tokenizer=None, **kwargs) -> str:
    """Write a tiny random Llama + tokenizer as a Hugging Face directory; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or make_tiny_tokenizer()
    model = make_tiny_llama(len(tokenizer), seed=seed, **kwargs)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def naive_sequence_logprobs(model, input_ids, attention_mask, target_mask) -> torch.Tensor:
    """Test oracle: the full-logits path (``[B, T, V]`` logits, fp32 log_softmax, gather), 0 off ``target_mask``.

    ``freeprm.engine.logprobs.full_logits_logprobs`` under its test name (production code imports that one).
    """
    from .engine.logprobs import full_logits_logprobs

    return full_logits_logprobs(model, input_ids, attention_mask, target_mask)
