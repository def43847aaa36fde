"""``ImplicitPRM``: dense implicit process rewards for RL loops, updated online from outcome labels (PRIME).

The PRM is a causal LM ``pi`` read against a reference ``pi_ref``. For a response token ``y_t``::

    r_t = beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))        (reference="none": log pi_ref = 0)

and its online update (PRIME, arXiv 2502.01456, which trains the implicit PRM of arXiv 2412.01981 on the
policy's own rollouts with the verifier's labels ``y in [0, 1]``) minimises the cross-entropy::

    loss = mean_b BCE(sigmoid(beta * sum_t (log pi - log pi_ref)[b, t]), y[b])

(``loss="dpo"``: ``-log sigmoid(R_c - R_r)`` over pairs, see ``update``). Log-probs come from
``freeprm.engine.sequence_logprobs``: the LM head is applied at the response rows only, in chunks, with a
custom backward, so neither scoring nor the update builds ``[tokens x vocab]`` logits.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import DEFAULT_TRAIN_BETA, NO_REFERENCE, UNSET, ScoringConfig, merge_config
from ..engine.loading import load_model, resolve_dtype
from ..engine.logprobs import full_logits_logprobs, sequence_logprobs
from ..engine.steps import GRANULARITIES, step_rewards_on_last_token
from ..kernels import ops
from ..trainer import losses
from . import checkpoint
from .batch import check_batch, check_outcome
from .reference import given_ref_logprobs, resolve_reference
from .update import clip_gradients, online_loss, online_loss_spec

MODES = ("before", "after", "none")


class Rewards(NamedTuple):
    """``token_rewards(..., return_version=True)``: the rewards and the PRM version that computed them."""

    rewards: torch.Tensor  # [B, T] float32
    version: int


class ImplicitPRM:
    """An implicit PRM for RL: dense token rewards, online CE/DPO updates, a version counter.

    Args:
        model: a Hugging Face causal LM (trained in place), a ``(model, tokenizer)`` pair, or a spec that
            ``freeprm.engine.loading.load_model`` accepts (HF directory, hub id, ``.gguf``, ``"smollm2"``).
        reference: ``pi_ref`` (docs/config.md). Unset (default): ``config.reference`` when the config gives one,
            else ``"frozen"`` (PRIME's): a frozen copy of the initial model; ``"policy"``: the caller passes
            ``ref_logprobs`` (e.g. the RL policy's old log-probs) to every ``token_rewards`` / ``update`` call; a
            model (or spec, or pair): that model, frozen; ``"none"``: no reference model (``log pi_ref = 0``).
            ``None`` is a deprecated spelling of ``"none"`` (``DeprecationWarning``).
        config: a ``freeprm.ScoringConfig`` (as ``Scorer(config=)``): beta, reference, step split
            (``step_delimiter`` / ``step_pattern``), dtype, and for ``score`` the aggregate, prompt format and
            max length. The keyword arguments of the same names, when given, win over it; a field given in neither
            keeps ImplicitPRM's default: beta ``DEFAULT_TRAIN_BETA`` (0.05, not the config's bare-model 1.0),
            the ``"frozen"`` reference, dtype float32 (``"auto"`` also means float32 here, as in ``train --dtype
            auto``; a model object keeps its own). ``self.scoring_config`` is the config used.
        tokenizer: needed for ``granularity="step"``, ``score`` and ``save_pretrained`` when ``model`` is an
            ``nn.Module`` (loaded with the model otherwise).
        beta: reward scale (default ``DEFAULT_TRAIN_BETA``, 0.05). granularity: ``"token"`` (dense) or ``"step"``
            (each step's summed reward on its last token; steps split at ``step_delimiter`` (default ``"\\n\\n"``)
            or the config's ``step_pattern`` in the decoded response; ``""`` or None: the whole response is one
            step, ``config.normalize_step_delimiter``).
        lr, grad_clip, weight_decay: AdamW settings of ``update`` (``grad_clip=None``: no clipping).
        mini_batch_size: rows per optimizer step in ``update`` (None: the whole batch, one step).
        loss: a loss of the trainer's registry (``freeprm.trainer.losses``) that needs no extra sequences:
            ``"ce"`` (PRIME), ``"dpo"`` or ``"nca"`` (``ONLINE_LOSSES``).
        device, dtype: where the models live (default: CUDA when available, float32); an ``nn.Module`` is
            moved only when they are given (dtype: a name, a ``torch.dtype``, or the config's ``dtype``).
        impl: kernel dispatch of the log-prob op (``"auto" | "triton" | "torch"``).
        full_logits: the naive ``[B, T, V]`` logits path instead of the chunked LM head (a baseline for
            benchmarks and tests; same results, much more memory).

    ``version`` starts at 0 and increments once per ``update`` call; ``token_rewards(...,
    return_version=True)``, ``step`` and ``score`` report the version their rewards came from.
    """

    def __init__(
        self,
        model,
        reference=UNSET,
        *,
        config: ScoringConfig | None = None,
        tokenizer=None,
        beta: float = UNSET,
        granularity: str = "token",
        step_delimiter: str | None = UNSET,
        lr: float = 1e-6,
        grad_clip: float | None = 10.0,
        mini_batch_size: int | None = None,
        loss: str = "ce",
        weight_decay: float = 0.0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = UNSET,
        impl: str = "auto",
        full_logits: bool = False,
    ) -> None:
        if reference is None:
            warnings.warn("ImplicitPRM(reference=None) meaning reference-free is deprecated (None will mean the "
                          "default, the initial policy); pass reference='none' (docs/config.md)", DeprecationWarning,
                          stacklevel=2)
            reference = NO_REFERENCE
        # keywords win over config; what neither gives keeps ImplicitPRM's defaults (docstring)
        cfg = merge_config(config, reference=reference, beta=beta, step_delimiter=step_delimiter, dtype=dtype)
        if not cfg.is_given("beta"):
            cfg = cfg.replace(beta=DEFAULT_TRAIN_BETA)
        reference = "frozen" if cfg.reference is None else cfg.reference
        dtype = cfg.dtype if cfg.is_given("dtype") and cfg.dtype != "auto" else None
        beta, step_delimiter, step_pattern = cfg.beta, cfg.step_delimiter, cfg.compiled_pattern
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self._loss_spec = online_loss_spec(loss)
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None (no clipping), got {grad_clip!r}")
        if mini_batch_size is not None and (not isinstance(mini_batch_size, int) or mini_batch_size < 1):
            raise ValueError(f"mini_batch_size must be a positive int or None, got {mini_batch_size!r}")
        opts = dict(dtype=dtype or "float32", device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model, torch.nn.Module):
            self.model, self.tokenizer = model, tokenizer
            if dtype is not None:
                self.model.to(resolve_dtype(dtype))
            if device is not None:
                self.model.to(device)
        else:
            self.model, tok = load_model(model, **opts, tokenizer=tokenizer)
            self.tokenizer = tokenizer or tok
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.reference_kind, self.reference = resolve_reference(reference, self.model, dtype=opts["dtype"],
                                                                device=self.device)
        self.reference_spec = None  # a reference model's spec, recorded by save_pretrained
        if self.reference_kind == "model" and isinstance(reference, (str, os.PathLike)):
            local = Path(reference).expanduser()
            self.reference_spec = str(local.resolve()) if local.exists() else str(reference)
        self.beta, self.granularity, self.step_delimiter = float(beta), granularity, step_delimiter
        self.step_pattern = step_pattern
        # the config used; its reference: "none", a model's spec, a model object, or unset (None) for the frozen
        # copy and "policy" (no spec until save_pretrained records one)
        ref_of = {"none": NO_REFERENCE, "frozen": None, "policy": None}
        ref_field = self.reference_spec or ref_of.get(self.reference_kind, cfg.reference)
        self.scoring_config = cfg.replace(reference=ref_field) if ref_field != cfg.reference else cfg
        self.lr, self.grad_clip, self.weight_decay = float(lr), grad_clip, float(weight_decay)
        self.mini_batch_size, self.loss, self.impl, self.full_logits = mini_batch_size, loss, impl, full_logits
        self.version = 0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        self._scorer = None

    # ------------------------------------------------------------------------------ log-probs
    def _logprobs(self, model, input_ids, attention_mask, response_mask) -> torch.Tensor:
        if self.full_logits:
            return full_logits_logprobs(model, input_ids, attention_mask, response_mask)
        return sequence_logprobs(model, input_ids, attention_mask, response_mask, impl=self.impl)

    def _ref_logprobs(self, input_ids, attention_mask, response_mask, ref_logprobs):
        """``log pi_ref`` ``[B, T]`` (0 off the response), or None when reference-free."""
        if ref_logprobs is not None:
            return given_ref_logprobs(self.reference_kind, ref_logprobs, input_ids, response_mask, self.device)
        if self.reference_kind == "policy":
            raise ValueError("reference='policy' needs ref_logprobs (the policy's log-probs of the response "
                             "tokens, [B, T]) on every call")
        if self.reference is None:
            return None
        with torch.no_grad():
            return self._logprobs(self.reference, input_ids, attention_mask, response_mask)

    def _inputs(self, input_ids, attention_mask, response_mask):
        check_batch(input_ids, attention_mask, response_mask)
        return input_ids.to(self.device), attention_mask.to(self.device), response_mask.to(self.device).bool()

    # -------------------------------------------------------------------------------- rewards
    def token_rewards(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        ref_logprobs: torch.Tensor | None = None,
        *,
        return_version: bool = False,
    ) -> torch.Tensor | Rewards:
        """Dense rewards ``[B, T]`` float32: ``beta * (log pi - log pi_ref)`` at ``response_mask``, 0 elsewhere.

        Equivalent plain torch (never building the logits here)::

            lp = log_softmax(model(input_ids).logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
            r = zeros(B, T); r[:, 1:] = beta * (lp - lp_ref) * response_mask[:, 1:]

        input_ids, attention_mask, response_mask: ``[B, T]``, any padding side; ``response_mask[:, 0]``
        must be False. ``ref_logprobs``: ``[B, T]`` log pi_ref at the response tokens; given, no reference
        forward runs (required with ``reference="policy"``). ``granularity="step"``: each step's reward
        (the sum of its tokens' rewards) sits on the step's last token, 0 on its other tokens.
        A row's rewards do not depend on the other rows. ``return_version=True`` returns
        ``Rewards(rewards, version)``.
        """
        ids, am, rm = self._inputs(input_ids, attention_mask, response_mask)
        with torch.no_grad():
            lp = self._logprobs(self.model, ids, am, rm)
            lpr = self._ref_logprobs(ids, am, rm, ref_logprobs)
            r = ops.token_rewards(lp, lpr, rm, self.beta, impl=self.impl).float()
        if self.granularity == "step":
            if self.tokenizer is None:
                raise ValueError("granularity='step' needs the tokenizer: pass tokenizer= to ImplicitPRM")
            r = step_rewards_on_last_token(r, ids, rm, self.tokenizer, step_delimiter=self.step_delimiter,
                                           step_pattern=self.step_pattern)
        return Rewards(r, self.version) if return_version else r

    # --------------------------------------------------------------------------------- update
    def update(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        outcome: torch.Tensor,
        ref_logprobs: torch.Tensor | None = None,
        *,
        groups: torch.Tensor | None = None,
    ) -> dict:
        """One online pass over the batch: mini-batches of ``mini_batch_size`` rows, one AdamW step each.

        ``loss="ce"`` (PRIME): ``mean_b BCE(sigmoid(R_b), outcome_b)`` with the response reward
        ``R_b = beta * sum_t (log pi - log pi_ref)[b, t]`` over the response tokens. Equivalent plain torch::

            R = beta * ((logp - logp_ref) * response_mask).sum(-1)            # [mb]
            loss = F.binary_cross_entropy_with_logits(R, outcome)            # then backward, clip, AdamW step

        ``loss="dpo"``: pairs are formed inside each mini-batch, among rows with the same ``groups`` id
        (int ``[B]``, e.g. the prompt index; None = all rows of the mini-batch are one group): every
        (i, j) with ``outcome_i > outcome_j`` is a pair with ``i`` chosen; loss = mean over pairs of
        ``-log sigmoid(R_i - R_j)``. A mini-batch without a pair takes no optimizer step.

        outcome: ``[B]`` labels in ``[0, 1]``. Returns metrics: ``loss`` (mean over mini-batches, weighted by
        rows), ``accuracy`` (fraction of rows where ``R_b > 0`` agrees with ``outcome_b > 0.5``, ``R`` from the
        forward before each step), ``grad_norm`` (mean pre-clip norm over the optimizer steps),
        ``optimizer_steps``, ``version`` (after this update). ``param.grad`` keeps the last step's gradients
        (after clipping) until the next update.
        """
        ids, am, rm = self._inputs(input_ids, attention_mask, response_mask)
        b = ids.shape[0]
        y = check_outcome(outcome, b).to(self.device)
        if groups is not None:
            if not isinstance(groups, torch.Tensor) or groups.shape != (b,) or groups.is_floating_point():
                raise ValueError(f"groups must be an int tensor [B]={b} (one group id per row)")
            groups = groups.to(self.device)
        if self.reference_kind == "policy" and ref_logprobs is None:
            raise ValueError("reference='policy' needs ref_logprobs for update too")
        mbs = self.mini_batch_size or b
        tot_loss, n_loss_rows, correct, norms, steps = 0.0, 0, 0, [], 0
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        try:
            for a in range(0, b, mbs):
                sl = slice(a, min(b, a + mbs))
                lpr = self._ref_logprobs(ids[sl], am[sl], rm[sl], None if ref_logprobs is None else ref_logprobs[sl])
                lp = self._logprobs(self.model, ids[sl], am[sl], rm[sl])
                rewards = losses.response_rewards(lp, lpr, rm[sl], self.beta)  # [mb]
                correct += int(((rewards.detach() > 0) == (y[sl] > 0.5)).sum())
                loss = online_loss(self._loss_spec, rewards, y[sl], None if groups is None else groups[sl])
                if loss is None:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norms.append(clip_gradients(self.params, self.grad_clip))
                self.optimizer.step()
                steps += 1
                tot_loss += float(loss.detach()) * (sl.stop - sl.start)
                n_loss_rows += sl.stop - sl.start
        finally:
            self.model.eval()
        self.version += 1
        return {"loss": tot_loss / n_loss_rows if n_loss_rows else float("nan"), "accuracy": correct / b,
                "grad_norm": sum(norms) / len(norms) if norms else float("nan"), "optimizer_steps": steps,
                "version": self.version}

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        outcome: torch.Tensor | None = None,
        mode: str = "before",
        ref_logprobs: torch.Tensor | None = None,
    ) -> dict:
        """PRIME's orders of scoring and updating one rollout batch.

        ``"before"``: update on ``outcome``, then score with the updated PRM; ``"after"``: score, then update
        (the rewards come from the PRM before this batch); ``"none"``: score only. Returns
        ``{"rewards": [B, T], "metrics": update metrics ({} for "none"), "version": the version that
        computed the rewards}``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "none" and outcome is None:
            raise ValueError(f"mode={mode!r} updates the PRM and needs outcome labels [B]")
        args = (input_ids, attention_mask, response_mask)
        metrics = {}
        if mode == "before":
            metrics = self.update(*args, outcome, ref_logprobs)
        rewards = self.token_rewards(*args, ref_logprobs, return_version=True)
        if mode == "after":
            metrics = self.update(*args, outcome, ref_logprobs)
        return {"rewards": rewards.rewards, "metrics": metrics, "version": rewards.version}

    # ------------------------------------------------------------------------------ scoring
    def scorer(self, **kwargs):
        """A ``freeprm.engine.Scorer`` over this PRM's models (shared objects, so updates show), beta, step split and
        the aggregate / prompt format / max length its config gives; ``kwargs`` (Scorer options) win."""
        from ..engine.scorer import Scorer

        if self.reference_kind == "policy":
            raise ValueError("score() needs a reference model; with reference='policy' use token_rewards(..., "
                             "ref_logprobs=...)")
        if self.tokenizer is None:
            raise ValueError("score() needs the tokenizer: pass tokenizer= to ImplicitPRM")
        ref = None if self.reference is None else (self.reference, self.tokenizer)
        c = self.scoring_config
        opts = {k: getattr(c, k) for k in ("step_pattern", "aggregate", "prompt_format", "max_length") if c.is_given(k)}
        opts.update(kwargs)
        return Scorer((self.model, self.tokenizer), ref, beta=self.beta, step_delimiter=self.step_delimiter,
                      device=self.device, impl=self.impl, **opts)

    def score(self, items: Iterable[Mapping], *, aggregate: str | None = None, progress: bool = False) -> list:
        """``freeprm.engine.Scorer.score`` with this PRM (items ``{"prompt", "response"}`` or ``{"prompt", "steps"}``).

        ``aggregate``: None = the config's (default ``"min"``). Each ``ScoreResult.meta["prm_version"]`` is the
        version that computed it.
        """
        if self._scorer is None:
            self._scorer = self.scorer()
        self.model.eval()
        results = self._scorer.score(items, aggregate=aggregate, progress=progress)
        for r in results:
            r.meta["prm_version"] = self.version
        return results

    # ------------------------------------------------------------------------------ state
    def config(self) -> dict:
        """The settings ``save_pretrained`` records (and ``from_pretrained`` restores), with the version."""
        return {"beta": self.beta, "step_delimiter": self.step_delimiter, **checkpoint.prm_settings(self)}

    def state_dict(self) -> dict:
        """Model weights, optimizer state, version (and the frozen reference's weights when it owns one)."""
        sd = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "version": self.version,
              "config": self.config()}
        if self.reference_kind == "frozen":
            sd["reference"] = self.reference.state_dict()
        return sd

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()``'s model weights, optimizer state, version (and frozen reference)."""
        missing = [k for k in ("model", "optimizer", "version") if k not in state]
        if missing:
            raise ValueError(f"state lacks {missing}; pass what ImplicitPRM.state_dict() returned")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "reference" in state:
            if self.reference_kind != "frozen":
                raise ValueError("the state holds a frozen reference but this PRM's reference is "
                                 f"{self.reference_kind!r}; build it with reference='frozen'")
            self.reference.load_state_dict(state["reference"])
        self.version = int(state["version"])

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write an HF directory (safetensors + tokenizer) that ``Scorer`` / ``load_model`` load as a policy.

        Also written: ``freeprm_prm.json`` (``freeprm.prm_meta``: beta, reference and its content digest,
        step delimiter, loss; the online settings and version), ``optimizer.pt`` (optimizer state, read back
        with ``weights_only=True``) and, with ``reference="frozen"``, the reference in ``reference/``.
        """
        return checkpoint.save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, reference="saved", *, config: ScoringConfig | None = None,
                        force_reference: bool = False, **kwargs) -> ImplicitPRM:
        """Load a ``save_pretrained`` directory (or one ``freeprm train`` wrote): weights, settings, version,
        optimizer state.

        ``reference="saved"`` restores what was saved (the frozen reference from ``reference/``, a reference
        model from its recorded path; ``"policy"``; none), checked against the content digest recorded in
        ``freeprm_prm.json``; a reference given here (or in ``config``) is checked against it too. A differing
        digest is a ``ValueError`` unless ``force_reference=True``. ``config`` and the keyword arguments
        override the saved settings (``beta``, ``lr``, ``device``, ...; keywords win over ``config``); the
        scoring fields given in neither (beta, prompt format, step split) are filled from the recorded
        ``ScoringConfig`` (``freeprm.prm_meta.fill_config``, the rule ``Scorer`` follows: a given beta or prompt
        format that differs from the recorded one warns, a step split only when the PRM was trained per step).
        """
        return checkpoint.from_pretrained(cls, path, reference, config=config, force_reference=force_reference,
                                          **kwargs)
