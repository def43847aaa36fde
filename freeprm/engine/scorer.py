"""``score()`` and ``Scorer``: implicit process rewards for (prompt, response) pairs (orchestration).

For each response token ``y_i``::

    r_i = beta * (log pi(y_i | y_<i) - log pi_ref(y_i | y_<i))      (reference=None: log pi_ref = 0)
    step_reward_k = sum of r_i over the tokens of step k
    q_k = sum_{j<=k} step_reward_j                                  (Q value at the end of step k)
    score = aggregate(step_rewards)   # min by default; also last, mean, sum, and q_* over Q values

Log-probs come from the LM head applied only at response positions, chunked, fp32 logsumexp:
never a ``[tokens x vocab]`` tensor. The pieces live in their own modules:

* ``items.py``: validation, step splitting and tokenization of an item -> ``PreparedItem`` (no model work);
* ``batching.py``: length-bucketed, padded batches (position ids restart at each row's first real token,
  so a response's score does not depend on what it is batched with);
* ``prefill.py``: items whose prompt token ids are identical (best-of-N candidates) run the prompt once
  and reuse its KV cache for every candidate (``share_prompt=True``, the default);
* ``results.py``: ``ScoreResult``, ``BatchScores``, ``TokenRewards``, the aggregations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import warnings
from collections.abc import Iterable, Mapping

import torch

from ..config import (
    DEFAULT_POLICY,
    MAX_LENGTH_LIMIT,  # noqa: F401  (re-exported: checked by ScoringConfig)
    UNSET,
    ScoringConfig,
    merge_config,
)
from ..kernels import linear_logprobs, ops
from ..prm_meta import resolve_config
from .batching import PackedBatch, length_batches, pack_batch, pack_rows, pad_batch, pad_id_of
from .items import PreparedItem, prepare_item
from .loading import auto_dtype, load_model, resolve_dtype
from .logprobs import scatter_rows, sequence_logprobs, split_lm, target_hidden
from .prefill import SharedPromptUnsupported, shared_prompt_hidden
from .results import AGGREGATIONS, BatchScores, ScoreResult, TokenRewards, aggregate_steps

__all__ = ["AGGREGATIONS", "BatchScores", "PreparedItem", "ScoreResult", "Scorer", "TokenRewards", "score"]

# "auto" packing packs a batch when that removes at least this fraction of its padded tokens: fewer rows of the same
# length, so less work whatever the attention kernel (measured: bench/README.md, packing)
PACK_MIN_SAVING = 0.25


def _plain_causal(model: torch.nn.Module) -> bool:
    """Does a custom 4-D mask mean exactly "causal within a sequence" for this model? (sdpa/eager, no sliding window)"""
    cfg = getattr(model.config, "text_config", None) or model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager", None)


def _model_object(spec):
    if isinstance(spec, tuple) and spec and isinstance(spec[0], torch.nn.Module):
        return spec[0]
    return spec if isinstance(spec, torch.nn.Module) else None


def _check_unknown(where: str, unknown: Mapping, known: Iterable[str]) -> None:
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(sorted(map(repr, unknown)))}; "
                         f"valid options are {', '.join(sorted(known))}")


class Scorer:
    """Keeps a policy (and optional reference) loaded and scores responses with them.

    Args:
        policy: model spec for ``load_model`` (HF dir, hub id, ``.gguf``, ``"smollm2"``) or ``(model, tokenizer)``.
            A PRM directory written by freeprm carries ``freeprm_prm.json`` (``freeprm/prm_meta.py``): its beta,
            reference, prompt format and step split are then used where not given here (a given one that differs
            is used with a warning naming both values).
        reference: ``pi_ref`` (docs/config.md): the same kinds; ``"none"`` for no reference (``log pi_ref = 0``);
            None (unset): the reference recorded in a PRM directory's metadata, else none. A reference whose
            content differs from the recorded one is a ``ValueError`` unless ``force_reference=True``.
        config: a ``freeprm.ScoringConfig`` (beta, reference, step split, aggregate, prompt format, dtype,
            max_length); the keyword arguments of the same names, when given, win over it. Fields given neither
            here nor in ``config`` (``ScoringConfig.given``) come from a PRM directory's metadata, else their
            defaults. ``self.config`` is the config used (its reference resolved: a spec, a model or ``"none"``).
        beta: reward scale (unset: the PRM directory's recorded beta, else ``DEFAULT_BETA`` = 1.0).
        reference_free: True is the same as ``reference="none"``.
        step_delimiter / step_pattern: how responses split into steps (see ``steps.py``; ``""`` or None = one step).
        aggregate: default aggregation, one of ``AGGREGATIONS``.
        prompt_format: ``"auto" | "chat" | "raw"`` (see ``tokenization.py``; unset: the recorded one, else auto).
        dtype: ``"auto"`` (default: bfloat16 on CUDA, float32 on CPU; a model object keeps its own dtype),
            ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``. Log-probs and rewards are always
            fp32; the dtype is that of the model weights and activations (bf16 vs fp32 error: docs/engine.md).
        device: where the models run (default: a model object's own device, else CUDA when available).
        max_length: longest prompt+response in tokens (default: the model's max positions); inputs longer
            than 32 characters per token of it are rejected before tokenizing (see ``items.py``).
        max_batch_tokens: padded tokens per forward batch.
        padding_side: ``"right"`` or ``"left"``; results do not depend on it.
        impl: kernel dispatch for the log-prob op (``"auto" | "triton" | "torch"``).
        share_prompt: run a prompt shared by several items (identical prompt token ids) once and reuse its keys and
            values for each of them (``prefill.py``: cascade attention on CPU, a repeated KV cache elsewhere); results
            equal the unshared path up to fp32 rounding (tested: 1e-5 on a tiny model; on SmolLM2 as close to an
            fp64 run as the unshared path is). With cascade attention ``max_batch_tokens`` counts response tokens only.
            Models whose cache cannot be reused (sliding-window layers, no ``past_key_values``) fall back to the
            unshared path with a warning.
        pack: varlen packing of a batch's sequences several to a row (position ids restarting, block-diagonal causal
            attention: no cross-contamination, tested equal to the padded path to 1e-5). ``"auto"`` (default) packs a
            batch only where it pays: when packing removes at least ``PACK_MIN_SAVING`` of its padded tokens
            (``bench/bench_packing.py``; results in bench/README.md), on models with plain causal attention (sdpa/eager, no sliding window).
            ``True`` packs every batch on such models; ``False`` never packs.
        fuse_reference: opt-in. With a reference and the Triton path, compute ``beta * (log pi - log pi_ref)`` in
            one kernel launch reading both models' hidden states and LM heads; the per-model log-probs are then
            not kept (``ScoreResult.token_logprobs`` / ``ref_logprobs`` are None). Off by default, so results
            carry the same fields on every device.
        force_reference: use a reference whose content digest differs from the one a PRM directory records
            (a warning instead of the error).

    A ``(model, tokenizer)`` pair (or a model object) is used where it is, in its dtype, unless ``device`` /
    ``dtype`` are given: then it is moved / cast in place (``nn.Module.to``). Scoring runs the models in eval mode
    (no dropout) and restores each module's previous train/eval mode afterwards. Unknown options raise ValueError.
    """

    def __init__(
        self,
        policy=DEFAULT_POLICY,
        reference=None,
        *,
        config: ScoringConfig | None = None,
        beta: float | None = UNSET,
        reference_free: bool = UNSET,
        step_delimiter: str | None = UNSET,
        step_pattern: str | re.Pattern | None = UNSET,
        aggregate: str = UNSET,
        prompt_format: str | None = UNSET,
        dtype: str | torch.dtype = UNSET,
        device: str | torch.device | None = None,
        max_length: int | None = UNSET,
        max_batch_tokens: int = 8192,
        padding_side: str = "right",
        impl: str = "auto",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        share_prompt: bool = True,
        pack: bool | str = "auto",
        fuse_reference: bool = False,
        force_reference: bool = False,
        **unknown,
    ) -> None:
        _check_unknown("Scorer", unknown, _SCORER_OPTIONS)
        config = merge_config(config, reference=reference, beta=beta, reference_free=reference_free,
                              step_delimiter=step_delimiter, step_pattern=step_pattern, aggregate=aggregate,
                              prompt_format=prompt_format, dtype=dtype, max_length=max_length)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        if pack not in (True, False, "auto"):
            raise ValueError(f"pack must be True, False or 'auto', got {pack!r}")
        # a trained PRM directory's freeprm_prm.json fills what is not given (freeprm/prm_meta.py)
        config, self.prm_meta = resolve_config(policy, config, force_reference=force_reference)
        self.config = config
        try:
            step_pattern = config.compiled_pattern
        except (re.error, OverflowError, RecursionError) as e:  # OverflowError: a{99999999999}
            raise ValueError(f"step_pattern is not a valid regex: {e}") from e
        dtype, reference = config.dtype, config.reference_model
        obj = _model_object(policy)
        if device is not None:
            self.device = torch.device(device)
        elif obj is not None:
            self.device = next(obj.parameters()).device
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str) and dtype == "auto":
            torch_dtype = None if obj is not None else auto_dtype(self.device.type)
        else:
            torch_dtype = resolve_dtype(dtype)
        self.policy, self.tokenizer = self._load(policy, torch_dtype, device is not None, trust_remote_code, allow_pickle)
        self.reference = None
        if reference is not None:
            self.reference, ref_tok = self._load(reference, torch_dtype, True, trust_remote_code, allow_pickle)
            _check_same_vocab(self.tokenizer, ref_tok, self.policy, self.reference)
        self.dtype = next(self.policy.parameters()).dtype
        self.beta = config.beta
        self.step_delimiter, self.step_pattern = config.step_delimiter, step_pattern
        self.aggregate_name, self.prompt_format = config.aggregate, config.prompt_format
        cfg = getattr(self.policy.config, "text_config", None) or self.policy.config
        self.max_length = int(config.max_length or getattr(cfg, "max_position_embeddings", None) or 4096)
        self.max_batch_tokens, self.padding_side, self.impl = max_batch_tokens, padding_side, impl
        self.share_prompt, self.fuse_reference, self.pack = bool(share_prompt), bool(fuse_reference), pack
        self._share_supported = True
        self._prefill_attention = "auto"  # shared_prompt_hidden(attention=...); benchmarks compare "repeat"
        self.vocab_size = split_lm(self.policy)[1].weight.shape[0]
        self.pad_id = pad_id_of(self.tokenizer)

    def _load(self, spec, torch_dtype, move: bool, trust_remote_code: bool, allow_pickle: bool):
        """Load a spec on ``self.device``; a model object keeps its modes and is moved/cast only when asked."""
        obj = _model_object(spec)
        if obj is None:
            return load_model(spec, dtype=torch_dtype or torch.float32, device=self.device,
                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        modes = [(m, m.training) for m in obj.modules()]
        model, tok = load_model(spec)  # checks the weights (and sets eval mode, undone below)
        for m, training in modes:
            m.training = training
        if move:
            model.to(self.device)
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model, tok

    @contextlib.contextmanager
    def _eval_mode(self):
        """Models in eval mode for the duration; each module's previous mode is restored after."""
        models = [m for m in (self.policy, self.reference) if m is not None]
        modes = [(mod, mod.training) for m in models for mod in m.modules()]
        for m in models:
            m.eval()
        try:
            yield
        finally:
            for mod, training in modes:
                mod.training = training

    # ------------------------------------------------------------------ inputs
    def prepare(self, item: Mapping, index: int = 0) -> PreparedItem:
        """Validate one item, split its steps and tokenize it (no model work); see ``items.py`` for the checks."""
        return prepare_item(item, index, tokenizer=self.tokenizer, max_length=self.max_length,
                            vocab_size=self.vocab_size, step_delimiter=self.step_delimiter,
                            step_pattern=self.step_pattern, prompt_format=self.prompt_format)

    # ------------------------------------------------------------------ compute
    @torch.inference_mode()
    def token_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                      *, with_logprobs: bool = False) -> torch.Tensor | TokenRewards:
        """Tensor form for RL loops (``freeprm.engine.protocols.TokenRewardSource``): fp32 ``[B, T]`` rewards.

        ``rewards = beta * (logp - logp_ref) * response_mask``, 0 off the mask; inputs ``[B, T]`` on any padding
        side. ``response_mask[:, 0]`` must be False and ``response_mask`` only on real tokens (checked here, once
        per call: the inner log-prob functions check shapes only). ``with_logprobs=True`` returns
        ``TokenRewards(rewards, logp, logp_ref)`` (each fp32 ``[B, T]``; ``logp_ref`` None without a reference).
        """
        out = self._token_rewards_checked(input_ids, attention_mask, response_mask)
        return out if with_logprobs else out.rewards

    def token_rewards_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               response_mask: torch.Tensor) -> TokenRewards:
        """Deprecated: ``token_rewards(input_ids, attention_mask, response_mask, with_logprobs=True)``."""
        warnings.warn("Scorer.token_rewards_from_ids is deprecated; use Scorer.token_rewards (rewards [B, T]) or "
                      "token_rewards(..., with_logprobs=True) (rewards and log-probs)", DeprecationWarning, stacklevel=2)
        return self.token_rewards(input_ids, attention_mask, response_mask, with_logprobs=True)

    @torch.inference_mode()
    def _token_rewards_checked(self, input_ids, attention_mask, response_mask) -> TokenRewards:
        if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids, attention_mask and response_mask must share one [B, T] shape; got "
                             f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
        response_mask = response_mask.bool()
        if bool(response_mask[:, 0].any()):
            raise ValueError("response_mask[:, 0] must be False: the first token of a row has no context to score it")
        if bool((response_mask & ~attention_mask.bool()).any()):
            raise ValueError("response_mask marks padding positions (attention_mask == 0)")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}) (the model's vocabulary)")
        with self._eval_mode():
            return self._token_rewards(input_ids, attention_mask, response_mask)

    def _token_rewards(self, input_ids, attention_mask, response_mask) -> TokenRewards:
        input_ids, attention_mask, response_mask = (x.to(self.device) for x in (input_ids, attention_mask, response_mask))
        if self._fuse_reference():
            # one kernel launch reads both models' hidden states and LM heads (CUDA / Triton)
            hp, head_p, (b_idx, t_idx) = target_hidden(self.policy, input_ids, attention_mask, response_mask)
            hr, head_r, _ = target_hidden(self.reference, input_ids, attention_mask, response_mask)
            r = ops.policy_ref_rewards(hp, head_p.weight, hr, head_r.weight, input_ids[b_idx, t_idx], self.beta,
                                       logit_scale=head_p.logit_scale, softcap=head_p.softcap, impl=self.impl)
            return TokenRewards(scatter_rows(r, b_idx, t_idx, input_ids.shape), None, None)
        lp = sequence_logprobs(self.policy, input_ids, attention_mask, response_mask, impl=self.impl)
        lpr = None
        if self.reference is not None:
            lpr = sequence_logprobs(self.reference, input_ids, attention_mask, response_mask, impl=self.impl)
        r = ops.token_rewards(lp, lpr, response_mask, self.beta, impl=self.impl)
        return TokenRewards(r, lp, lpr)

    def _fuse_reference(self) -> bool:
        """Use the fused policy-minus-reference kernel: opted in, Triton dispatch, a reference, the same logit transform."""
        if self.reference is None or not self.fuse_reference:
            return False
        if self.impl == "torch" or (self.impl == "auto" and self.device.type != "cuda"):
            return False
        hp, hr = split_lm(self.policy)[1], split_lm(self.reference)[1]
        return (hp.logit_scale, hp.softcap) == (hr.logit_scale, hr.softcap) and hp.weight.shape[0] == hr.weight.shape[0]

    def _run_padded(self, prepared: list[PreparedItem], out: list, bar) -> None:
        """Length-bucketed batches (padded, or packed where it pays); fills ``out[p.index] = (rewards, logp, logp_ref)``."""
        for idx in length_batches([len(p.input_ids) for p in prepared], self.max_batch_tokens):
            batch = [prepared[i] for i in idx]
            starts = [p.response_start for p in batch]
            if self._should_pack([len(p.input_ids) for p in batch]):
                pk = pack_batch([p.input_ids for p in batch], self.pad_id, target_starts=starts, device=self.device)
                tr, cut = self._token_rewards_packed(pk), pk.unpack
            else:
                pb = pad_batch([p.input_ids for p in batch], self.pad_id, side=self.padding_side,
                               target_starts=starts, device=self.device)
                tr, cut = self._token_rewards(pb.input_ids, pb.attention_mask, pb.target_mask), pb.unpad
            r, lp, lpr = (None if x is None else x.cpu() for x in (tr.rewards, tr.logp, tr.logp_ref))
            for b, p in enumerate(batch):
                out[p.index] = tuple(None if x is None else cut(x, b, p.response_start).clone() for x in (r, lp, lpr))
            if bar is not None:
                bar.update(len(batch))

    def _should_pack(self, lengths: list[int]) -> bool:
        """Pack this batch? (``pack`` option; "auto": only where it removes >= PACK_MIN_SAVING of the padded tokens)."""
        if self.pack is False or len(lengths) < 2 or not self._pack_supported():
            return False
        if self.pack is True:
            return True
        t = max(lengths)
        return len(pack_rows(lengths, t)) * t <= (1.0 - PACK_MIN_SAVING) * len(lengths) * t

    def _pack_supported(self) -> bool:
        return all(_plain_causal(m) for m in (self.policy, self.reference) if m is not None)

    def _token_rewards_packed(self, pk: PackedBatch) -> TokenRewards:
        """``_token_rewards`` for a packed batch: a block-diagonal causal 4-D mask, position ids restarting per sequence."""
        b_idx, t_idx = pk.target_mask.nonzero(as_tuple=True)
        targets = pk.input_ids[b_idx, t_idx]

        def rows(model):
            base, head = split_lm(model)
            mask = pk.attention_mask_4d(next(base.parameters()).dtype)
            hs = base(input_ids=pk.input_ids, attention_mask=mask, position_ids=pk.position_ids,
                      use_cache=False).last_hidden_state  # [R, T, D]
            return hs[b_idx, t_idx - 1], head

        hp, head_p = rows(self.policy)
        hr, head_r = rows(self.reference) if self.reference is not None else (None, None)
        shape = pk.input_ids.shape
        if self._fuse_reference():
            r = ops.policy_ref_rewards(hp, head_p.weight, hr, head_r.weight, targets, self.beta,
                                       logit_scale=head_p.logit_scale, softcap=head_p.softcap, impl=self.impl)
            return TokenRewards(scatter_rows(r, b_idx, t_idx, shape), None, None)
        lp = linear_logprobs(hp, head_p.weight, targets, logit_scale=head_p.logit_scale, softcap=head_p.softcap,
                             impl=self.impl)
        lpr = None
        if hr is not None:
            lpr = linear_logprobs(hr, head_r.weight, targets, logit_scale=head_r.logit_scale, softcap=head_r.softcap,
                                  impl=self.impl)
        r = ops.token_rewards(lp, lpr, None, self.beta, impl=self.impl)
        return TokenRewards(*(None if x is None else scatter_rows(x, b_idx, t_idx, shape) for x in (r, lp, lpr)))

    def _group_logprobs(self, model, group: list[PreparedItem]):
        """Shared-prompt hidden rows of one group, concatenated: ``(rows [N, D], LMHead, targets [N])``."""
        base, head = split_lm(model)
        rows = shared_prompt_hidden(base, group[0].prompt_ids, [p.input_ids[p.response_start:] for p in group],
                                    pad_id=self.pad_id, max_batch_tokens=self.max_batch_tokens,
                                    attention=self._prefill_attention)
        return torch.cat(rows, 0), head

    def _run_shared(self, group: list[PreparedItem], out: list) -> None:
        """One group of items with identical prompt ids: the prompt runs once (``prefill.py``)."""
        targets = torch.tensor([t for p in group for t in p.input_ids[p.response_start:]], device=self.device)
        hp, head_p = self._group_logprobs(self.policy, group)
        hr, head_r = self._group_logprobs(self.reference, group) if self.reference is not None else (None, None)
        lp = lpr = None
        if self._fuse_reference():
            r = ops.policy_ref_rewards(hp, head_p.weight, hr, head_r.weight, targets, self.beta,
                                       logit_scale=head_p.logit_scale, softcap=head_p.softcap, impl=self.impl)
        else:
            lp = linear_logprobs(hp, head_p.weight, targets, logit_scale=head_p.logit_scale, softcap=head_p.softcap,
                                 impl=self.impl)
            if hr is not None:
                lpr = linear_logprobs(hr, head_r.weight, targets, logit_scale=head_r.logit_scale,
                                      softcap=head_r.softcap, impl=self.impl)
            r = ops.token_rewards(lp, lpr, None, self.beta, impl=self.impl)
        r, lp, lpr = (None if x is None else x.float().cpu() for x in (r, lp, lpr))
        start = 0
        for p in group:
            sl = slice(start, start + p.num_response_tokens)
            out[p.index] = tuple(None if x is None else x[sl].clone() for x in (r, lp, lpr))
            start = sl.stop

    def _shared_groups(self, prepared: list[PreparedItem]) -> tuple[list[list[PreparedItem]], list[PreparedItem]]:
        """Groups of >= 2 items with identical prompt ids (when sharing is on), and the other items."""
        if not (self.share_prompt and self._share_supported):
            return [], prepared
        by_prompt: dict[tuple[int, ...], list[PreparedItem]] = {}
        for p in prepared:
            by_prompt.setdefault(tuple(p.prompt_ids), []).append(p)
        groups = [g for g in by_prompt.values() if len(g) >= 2]
        rest = [p for g in by_prompt.values() if len(g) < 2 for p in g]
        return groups, rest

    @torch.inference_mode()
    def _run(self, prepared: list[PreparedItem], progress: bool):
        """Per item (in input order): (token_rewards, logp, logp_ref) over its response tokens, on the CPU."""
        out: list = [None] * len(prepared)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prepared), desc="scoring", unit="resp")
        groups, rest = self._shared_groups(prepared)
        for gi, group in enumerate(groups):
            try:
                self._run_shared(group, out)
            except SharedPromptUnsupported as e:
                warnings.warn(f"share_prompt: {e}; scoring each sequence whole instead", stacklevel=3)
                self._share_supported = False
                rest = rest + [p for g in groups[gi:] for p in g]
                break
            if bar is not None:
                bar.update(len(group))
        self._run_padded(rest, out, bar)
        if bar is not None:
            bar.close()
        return out

    def _step_tensors(self, prepared: list[PreparedItem], rewards: list[torch.Tensor]):
        """Flattened step sums and Q values for all items: (step_rewards [S_total], q [S_total], cu_items [B+1])."""
        counts, n_steps = [], []
        for p in prepared:
            counts.append(torch.bincount(torch.tensor(p.token_steps, dtype=torch.long), minlength=len(p.spans)))
            n_steps.append(len(p.spans))
        cu_tok = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])
        cu_items = torch.tensor([0] + n_steps, dtype=torch.long).cumsum(0)
        # segmented reductions on the scoring device (Triton kernels on CUDA), results back on the CPU
        dev = self.device
        values = torch.cat(rewards).to(dev)
        step_rewards = ops.segment_sum(values, cu_tok.to(dev), impl=self.impl)
        q = ops.segment_cumsum(step_rewards, cu_items.to(dev), impl=self.impl)
        return step_rewards.cpu(), q.cpu(), cu_items

    def score(self, items: Iterable[Mapping], *, aggregate: str | None = None, progress: bool = False,
              **unknown) -> list[ScoreResult]:
        """Score each item (``{"prompt", "response"}`` and/or ``{"prompt", "steps"}``); results in input order.

        All items are validated before any model work, so a bad item raises ``ValueError``
        (naming its index) and nothing is lost. Unknown keyword arguments raise ``ValueError``.
        """
        _check_unknown("Scorer.score", unknown, ("aggregate", "progress"))
        aggregate = aggregate or self.aggregate_name
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        prepared = [self.prepare(it, i) for i, it in enumerate(items)]
        return self.score_prepared(prepared, aggregate=aggregate, progress=progress)

    def score_prepared(self, prepared: list[PreparedItem], *, aggregate: str | None = None,
                       progress: bool = False) -> list[ScoreResult]:
        """Score items already validated by ``prepare`` (results in the order given)."""
        aggregate = aggregate or self.aggregate_name
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        prepared = [dataclasses.replace(p, index=i) for i, p in enumerate(prepared)]
        if not prepared:
            return []
        with self._eval_mode():
            per_item = self._run(prepared, progress)
        step_rewards, q, cu = self._step_tensors(prepared, [x[0] for x in per_item])
        results = []
        for i, p in enumerate(prepared):
            r, lp, lpr = per_item[i]
            sr, qv = step_rewards[cu[i]:cu[i + 1]].clone(), q[cu[i]:cu[i + 1]].clone()
            results.append(ScoreResult(
                score=aggregate_steps(sr, qv, aggregate), aggregation=aggregate, step_rewards=sr, q_values=qv,
                token_rewards=r, token_steps=torch.tensor(p.token_steps, dtype=torch.long),
                input_ids=torch.tensor(p.input_ids, dtype=torch.long), response_start=p.response_start,
                steps=p.steps, step_spans=p.spans, token_logprobs=lp, ref_logprobs=lpr, beta=self.beta, meta=p.meta))
        return results

    def score_batch(self, items: Iterable[Mapping], *, aggregate: str | None = None) -> BatchScores:
        """Like ``score`` but returns padded ``[B, ...]`` tensors (see ``BatchScores``)."""
        results = self.score(items, aggregate=aggregate)
        b = len(results)
        t = max((len(r.token_rewards) for r in results), default=0)
        s = max((len(r.step_rewards) for r in results), default=0)
        out = BatchScores(torch.zeros(b, t), torch.zeros(b, t, dtype=torch.bool), torch.full((b, t), -1, dtype=torch.long),
                          torch.zeros(b, s), torch.zeros(b, s, dtype=torch.bool), torch.tensor([r.score for r in results]))
        for i, r in enumerate(results):
            n, k = len(r.token_rewards), len(r.step_rewards)
            out.token_rewards[i, :n], out.mask[i, :n], out.token_steps[i, :n] = r.token_rewards, True, r.token_steps
            out.step_rewards[i, :k], out.step_mask[i, :k] = r.step_rewards, True
        return out


_SCORER_OPTIONS = tuple(n for n, p in inspect.signature(Scorer.__init__).parameters.items()
                        if n not in ("self", "unknown"))


def _check_same_vocab(tok_a, tok_b, model_a, model_b) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError("policy and reference tokenizers differ (vocabularies are not identical); the reference "
                         "must share the policy's tokenizer. Use a reference from the same model family, or none")
    va, vb = split_lm(model_a)[1].weight.shape[0], split_lm(model_b)[1].weight.shape[0]
    if min(va, vb) < len(tok_a):
        raise ValueError(f"LM head sizes ({va}, {vb}) do not cover the tokenizer's {len(tok_a)} tokens")


def score(
    items: Iterable[Mapping],
    policy=DEFAULT_POLICY,
    reference=None,
    *,
    config: ScoringConfig | None = None,
    progress: bool = False,
    **scorer_kwargs,
) -> list[ScoreResult]:
    """Implicit process rewards of ``items``; a thin wrapper over ``Scorer(...).score(items)``.

    ``results[i].score`` is the min step reward by default; see ``ScoreResult`` for the fields. ``config`` and
    the other keyword arguments go to ``Scorer`` (``beta``, ``step_delimiter``, ``aggregate``, ``step_pattern``,
    ``prompt_format``, ``dtype``, ``share_prompt``, ...); an unknown one raises ``ValueError``. For repeated calls,
    build one ``Scorer`` and keep it: this function loads the models each time.
    """
    scorer = Scorer(policy, reference, config=config, **scorer_kwargs)
    return scorer.score(items, progress=progress)
