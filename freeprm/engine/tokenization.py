"""Prompt + response -> token ids, with the response's character offsets.

The prompt and the response are tokenized separately and concatenated, so the response tokens
are exactly a tokenization of the response text and their offset mapping indexes it directly
(no re-tokenizing of prefixes, no token straddling the prompt/response boundary).

``prompt_format``:
  * ``"chat"``: the prompt is the user turn of the tokenizer's chat template, with the
    generation prompt (``<|im_start|>assistant\\n`` or the like) after it;
  * ``"raw"``: the prompt text as is (with BOS if the tokenizer adds one); put any separator
    (e.g. a trailing newline) in the prompt yourself;
  * ``"auto"`` (default): ``"chat"`` when the tokenizer has a chat template, else ``"raw"``.

End markers: a response that ends with the text of the tokenizer's EOS or pad token (``<|im_end|>``,
``<|endoftext|>``: what a framework leaves when it decodes with ``skip_special_tokens=False``) has those
markers removed before it is split and tokenized (``strip_end_markers``). A response is scored on its
text, so ``"... 42.<|im_end|>"`` and ``"... 42."`` get the same steps and rewards whichever adapter
passed them (``freeprm serve``, ``Scorer.score``, the TRL reward function).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PROMPT_FORMATS


@dataclass
class Encoded:
    input_ids: list[int]  # prompt + response tokens
    response_start: int  # index of the first response token
    offsets: list[tuple[int, int]]  # per response token: (start, end) characters in the response


def end_markers(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's EOS and pad tokens (the non-empty ones, longest first)."""
    marks = {getattr(tokenizer, name, None) for name in ("eos_token", "pad_token")}
    return tuple(sorted((m for m in marks if isinstance(m, str) and m), key=len, reverse=True))


def strip_end_markers(text: str, tokenizer) -> str:
    """``text`` without the EOS / pad token texts repeated at its end (``"a.<|im_end|><|endoftext|>"`` -> ``"a."``)."""
    marks = end_markers(tokenizer)
    done = False
    while not done:
        done = True
        for m in marks:
            if text.endswith(m):
                text, done = text[:-len(m)], False
    return text


def prompt_ids(tokenizer, prompt: str, prompt_format: str = "auto") -> list[int]:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    use_chat = prompt_format == "chat" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format='chat' but the tokenizer has no chat template; use prompt_format='raw'")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise ValueError("the prompt encodes to no tokens and the tokenizer adds no BOS token: the first response "
                         "token would have no context; give a non-empty prompt")
    return list(ids)


def response_tokens(tokenizer, response: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("freeprm needs a fast (Rust) tokenizer for offset mappings; load it with use_fast=True")
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode(tokenizer, prompt: str, response: str, prompt_format: str = "auto") -> Encoded:
    """Token ids of ``prompt + response`` (see the module docstring) and the response offsets."""
    p = prompt_ids(tokenizer, prompt, prompt_format)
    r, offsets = response_tokens(tokenizer, response)
    if not r:
        raise ValueError("the response encodes to no tokens")
    return Encoded(p + r, len(p), offsets)
