"""Incremental implicit-PRM scoring: each live candidate keeps KV caches of ``pi`` and ``pi_ref``, so a new step costs
only its new tokens.

For response token ``y_i`` the reward is ``r_i = beta * (log pi(y_i | y_<i) - log pi_ref(y_i | y_<i))`` (``log pi_ref
= 0`` without a reference) and a step's reward is the sum over its tokens: the same quantities as
``freeprm.engine.Scorer.score``. ``IncrementalScorer.extend(cands, new_ids)`` runs only ``new_ids`` through each
model, on top of each candidate's cache (``kvcache.py``), batched across candidates and prompts; the LM head is
applied through ``freeprm.kernels.linear_logprobs`` at the new tokens' rows only (never ``[tokens x vocab]``).
``fork(cand, k)`` gives ``k`` children that share the parent's caches; ``drop(cand)`` frees its references.

**Token ids, not text.** A candidate is ``prompt_ids + response_ids``; ``prompt_ids`` are the scorer's formatting of
the prompt (``engine.tokenization.prompt_ids``: chat template or raw, as ``Scorer`` does), and ``response_ids`` are
the token ids it was extended with, as given: when the generator and the PRM share a tokenizer these are the
generator's own sampled ids, never re-tokenized. **Step ``k`` is exactly the ids passed to the ``k``-th
``extend``.** So, exactly (tested to 1e-5 in fp32 on tiny models and SmolLM2)::

    tr = scorer.token_rewards_from_ids(ids, ones, response_mask)    # ids = prompt_ids + response_ids, one row
    step_rewards[k] == tr.rewards[0, P + ends[k-1] : P + ends[k]].sum()

and ``Scorer.score({"prompt", "response": tokenizer.decode(response_ids)})`` gives the same step rewards whenever it
tokenizes the response text back into ``response_ids`` and its text rule (``engine/steps.py``: a token belongs to the
step owning its last character) assigns them to the same steps. The step generator (``generation.py``) cuts steps
so that this holds in the usual cases, including a token merged across the delimiter; ``docs/search.md`` lists
when text and ids disagree.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..engine.batching import length_batches
from ..engine.items import PreparedItem
from ..engine.results import aggregate_steps
from ..engine.scorer import Scorer
from ..engine.tokenization import prompt_ids as format_prompt
from ..kernels import linear_logprobs, ops
from .kvcache import CachedLM, KVState


@dataclass(eq=False)
class Candidate:
    """A partial solution: prompt and response token ids, per-step rewards, and its models' KV states."""

    prompt_index: int  # which prompt (pool) it belongs to
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    step_ends: list[int] = field(default_factory=list)  # response tokens at the end of each step (cumulative)
    token_rewards: list[torch.Tensor] = field(default_factory=list)  # per step: fp32 [n_k]
    step_rewards: list[float] = field(default_factory=list)
    states: dict[str, KVState] = field(default_factory=dict)  # model name -> cache state
    status: str = "live"  # live | eos | length | budget | dropped
    carry: list[int] = field(default_factory=list)  # generated ids that open the next step (generation.py)
    carry_rows: list[torch.Tensor] = field(default_factory=list)  # their predicting hidden states (shared cache)
    cut: list[bool] = field(default_factory=list)  # per step: ended by the per-step token limit (no delimiter)
    id: int = -1  # numbered by the IncrementalScorer that made it (0, 1, ... per run: reproducible)
    parent: int | None = None

    @property
    def num_steps(self) -> int:
        return len(self.step_rewards)

    @property
    def q_values(self) -> list[float]:
        return torch.tensor(self.step_rewards, dtype=torch.float32).cumsum(0).tolist()

    def score(self, aggregate: str) -> float:
        """``aggregate`` (one of ``engine.AGGREGATIONS``) of the step rewards; NaN with no step."""
        sr = torch.tensor(self.step_rewards, dtype=torch.float32)
        return aggregate_steps(sr, sr.cumsum(0), aggregate)

    def step_ids(self, k: int) -> list[int]:
        a = self.step_ends[k - 1] if k else 0
        return self.response_ids[a:self.step_ends[k]]

    def token_steps(self) -> list[int]:
        """Step index of each response token (the search's step map)."""
        out, a = [], 0
        for k, e in enumerate(self.step_ends):
            out += [k] * (e - a)
            a = e
        return out


@dataclass
class StepScore:
    """What ``extend`` returns per candidate: the new tokens' rewards and their sum (the step reward)."""

    token_rewards: torch.Tensor  # fp32 [n]
    step_reward: float
    logp: torch.Tensor  # fp32 [n] log pi
    logp_ref: torch.Tensor | None  # fp32 [n] log pi_ref, None without a reference


class IncrementalScorer:
    """Step-by-step implicit-PRM scoring with per-candidate KV caches (see the module docstring).

    Args:
        scorer: a ``Scorer`` (its models, beta, prompt format, ``impl``, ``max_length`` and ``max_batch_tokens``
            are used; a trained PRM directory's ``freeprm_prm.json`` applies through it), or None to build one
            from ``policy`` / ``reference`` / ``scorer_kwargs``.
    """

    def __init__(self, scorer: Scorer | None = None, *, policy=None, reference=None, **scorer_kwargs) -> None:
        if scorer is None:
            scorer = Scorer(policy, reference, **scorer_kwargs) if policy is not None else Scorer(reference=reference,
                                                                                                 **scorer_kwargs)
        elif policy is not None or reference is not None or scorer_kwargs:
            raise ValueError("pass either a ready scorer= or model specs (policy=, reference=, ...), not both")
        self.scorer = scorer
        self.tokenizer = scorer.tokenizer
        self.models = {"policy": CachedLM(scorer.policy, scorer.pad_id)}
        if scorer.reference is not None:
            self.models["reference"] = CachedLM(scorer.reference, scorer.pad_id)
        self.tokens_run = {name: 0 for name in self.models}  # tokens each model ran in extend
        self.reset_ids()

    def reset_ids(self) -> None:
        """Number new candidates from 0 again (a search run does this, so its ids do not depend on earlier runs)."""
        self._ids = itertools.count()

    # ------------------------------------------------------------------ candidates
    def prompt_ids(self, prompt: str) -> list[int]:
        """``prompt`` formatted as the scorer formats it (chat template or raw)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("empty prompt: every prompt needs text (a question to answer)")
        return format_prompt(self.tokenizer, prompt, self.scorer.prompt_format)

    @torch.inference_mode()
    def start(self, prompts: Sequence[str | Sequence[int]]) -> list[Candidate]:
        """One root candidate per prompt (text, formatted as the scorer does, or token ids), prompt run once."""
        ids = [self.prompt_ids(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} has no tokens")
            if len(p) >= self.scorer.max_length:
                raise ValueError(f"prompt {i}: {len(p)} tokens leave no room for a response within max_length="
                                 f"{self.scorer.max_length}")
        roots = [Candidate(i, p, id=next(self._ids)) for i, p in enumerate(ids)]
        with self.scorer._eval_mode():
            for idx in length_batches([len(p) for p in ids], self.scorer.max_batch_tokens):
                for name, lm in self.models.items():
                    for i, st in zip(idx, lm.prefill([ids[i] for i in idx])):
                        roots[i].states[name] = st
        return roots

    def fork(self, cand: Candidate, k: int) -> list[Candidate]:
        """``k`` children of ``cand`` sharing its caches (no copy: ``KVState`` is immutable)."""
        if cand.status == "dropped":
            raise ValueError(f"candidate {cand.id} was dropped; fork a live candidate")
        if k < 1:
            raise ValueError(f"fork needs k >= 1, got {k}")
        return [Candidate(cand.prompt_index, cand.prompt_ids, list(cand.response_ids), list(cand.step_ends),
                          list(cand.token_rewards), list(cand.step_rewards), dict(cand.states), cand.status,
                          list(cand.carry), list(cand.carry_rows), list(cand.cut), id=next(self._ids),
                          parent=cand.id) for _ in range(k)]

    @staticmethod
    def drop(cand: Candidate) -> None:
        """Free the candidate's cache references (memory is released once no other candidate shares them)."""
        cand.states = {}
        cand.status = "dropped"

    # ------------------------------------------------------------------ scoring
    def _check_extend(self, cands: Sequence[Candidate], new_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        if len(cands) != len(new_ids):
            raise ValueError(f"extend: {len(cands)} candidates but {len(new_ids)} id lists")
        out = []
        vocab = self.scorer.vocab_size
        for c, ids in zip(cands, new_ids):
            ids = [int(t) for t in ids]
            if c.status == "dropped" or "policy" not in c.states:
                raise ValueError(f"candidate {c.id} was dropped (or never started); extend live candidates only")
            if not ids:
                raise ValueError(f"candidate {c.id}: a step needs at least one token")
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"candidate {c.id}: token ids must lie in [0, {vocab})")
            total = len(c.prompt_ids) + len(c.response_ids) + len(ids)
            if total > self.scorer.max_length:
                raise ValueError(f"candidate {c.id}: {total} tokens exceed max_length={self.scorer.max_length}")
            out.append(ids)
        if len({id(c) for c in cands}) != len(cands):
            raise ValueError("extend: the same candidate appears twice; fork it first")
        return out

    @torch.inference_mode()
    def extend(self, cands: Sequence[Candidate], new_ids: Sequence[Sequence[int]], *,
               policy_rows: Sequence[torch.Tensor] | None = None) -> list[StepScore]:
        """Append one step (``new_ids[i]``, non-empty) to each ``cands[i]``; run only those tokens.

        ``policy_rows``: per candidate, the policy's final hidden states ``[len(new_ids[i]), D]`` that predicted the
        new tokens, when the generator that wrote them is the policy and shares its cache (it has then already
        advanced ``states["policy"]``): ``log pi`` comes from them and the policy does not run again.

        Returns per candidate its tokens' rewards and the step reward; the candidates are updated in place
        (``response_ids``, ``step_ends``, ``token_rewards``, ``step_rewards``, ``states``). Equivalent (to fp32
        rounding) to ``Scorer.token_rewards_from_ids`` on each whole ``prompt_ids + response_ids`` sequence, summed
        over the new tokens. Batched across all candidates given (any prompts) in ``max_batch_tokens`` chunks.
        """
        new_ids = self._check_extend(cands, new_ids)
        if policy_rows is not None:
            if len(policy_rows) != len(cands) or any(r.dim() != 2 or r.shape[0] != len(x)
                                                     for r, x in zip(policy_rows, new_ids)):
                raise ValueError("policy_rows must hold one [len(new_ids[i]), D] tensor per candidate")
        out: list[StepScore | None] = [None] * len(cands)
        sc = self.scorer
        lengths = [cands[i].states["policy"].length + len(new_ids[i]) for i in range(len(cands))]
        with sc._eval_mode():
            for idx in length_batches(lengths, sc.max_batch_tokens):
                rows = None if policy_rows is None else [policy_rows[i] for i in idx]
                self._extend_chunk([cands[i] for i in idx], [new_ids[i] for i in idx], idx, out, rows)
        return out  # type: ignore[return-value]

    def _extend_chunk(self, cands, new_ids, idx, out, policy_rows=None) -> None:
        sc = self.scorer
        b, t = len(cands), max(len(x) for x in new_ids)
        ids = torch.full((b, t), sc.pad_id, dtype=torch.long)
        valid = torch.zeros((b, t), dtype=torch.bool)
        for i, x in enumerate(new_ids):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            valid[i, :len(x)] = True
        targets = torch.tensor([tok for x in new_ids for tok in x], dtype=torch.long, device=sc.device)
        logps, new_states = {}, {}
        for name, lm in self.models.items():
            head = lm.head
            if name == "policy" and policy_rows is not None:  # the generator's cache is the policy's
                rows = torch.cat([r.to(sc.device) for r in policy_rows], 0)
            else:
                old = [c.states[name] for c in cands]
                first = [s.last_hidden for s in old]  # predicts each row's first new token
                batch = lm.open(old)
                hs = batch.forward(ids, valid)  # [B, T, D]
                rows = torch.cat([torch.cat([first[i][None], hs[i, :len(x) - 1]], 0) for i, x in enumerate(new_ids)])
                new_states[name] = batch.states()
                self.tokens_run[name] += int(valid.sum())
            logps[name] = linear_logprobs(rows, head.weight, targets, logit_scale=head.logit_scale,
                                          softcap=head.softcap, impl=sc.impl)  # [N] fp32
        lp, lpr = logps["policy"], logps.get("reference")
        r = ops.token_rewards(lp, lpr, None, sc.beta, impl=sc.impl).float().cpu()
        lp, lpr = lp.float().cpu(), None if lpr is None else lpr.float().cpu()
        start = 0
        for i, (c, x) in enumerate(zip(cands, new_ids)):
            sl = slice(start, start + len(x))
            start = sl.stop
            tr = r[sl].clone()
            step = float(tr.sum())
            c.response_ids += x
            c.step_ends.append(len(c.response_ids))
            c.token_rewards.append(tr)
            c.step_rewards.append(step)
            for name in new_states:
                c.states[name] = new_states[name][i]
            out[idx[i]] = StepScore(tr, step, lp[sl].clone(), None if lpr is None else lpr[sl].clone())

    # ------------------------------------------------------------------ baseline / checks
    def prepared(self, cand: Candidate) -> PreparedItem:
        """The candidate as a ``PreparedItem`` with the search's step map (for ``Scorer.score_prepared``)."""
        text = self.tokenizer.decode(cand.response_ids)
        steps = [self.tokenizer.decode(cand.step_ids(k)) for k in range(cand.num_steps)]
        return PreparedItem(0, list(cand.prompt_ids) + list(cand.response_ids), len(cand.prompt_ids),
                            cand.token_steps(), steps, [(0, len(text))] * cand.num_steps, {})

    def rescore_full(self, cands: Sequence[Candidate]) -> list[list[float]]:
        """Step rewards of each candidate by re-scoring its whole prompt + response (``Scorer.score_prepared``, with
        its shared-prompt prefill): the cost the incremental path avoids, and the check of its exactness."""
        res = self.scorer.score_prepared([self.prepared(c) for c in cands])
        return [r.step_rewards.tolist() for r in res]
