"""``ImplicitPRM``: dense implicit process rewards for RL loops, updated online from outcome labels (PRIME).

The PRM is a causal LM ``pi`` read against a reference ``pi_ref``. For a response token ``y_t``::

    r_t = beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))        (reference=None: log pi_ref = 0)

and its online update (PRIME, arXiv 2502.01456, which trains the implicit PRM of arXiv 2412.01981 on the
policy's own rollouts with the verifier's labels ``y in [0, 1]``) minimises the cross-entropy::

    loss = mean_b BCE(sigmoid(beta * sum_t (log pi - log pi_ref)[b, t]), y[b])

(``loss="dpo"``: ``-log sigmoid(R_c - R_r)`` over pairs, see ``update``). Log-probs come from
``freeprm.engine.sequence_logprobs``: the LM head is applied at the response rows only, in chunks, with a
custom backward, so neither scoring nor the update builds ``[tokens x vocab]`` logits.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from ..engine.loading import load_model, resolve_dtype
from ..engine.logprobs import sequence_logprobs
from ..engine.steps import split_steps, token_steps
from ..kernels import ops
from ..testing import naive_sequence_logprobs  # the full-logits path (full_logits=True baseline)
from ..trainer import losses

GRANULARITIES = ("token", "step")
LOSSES = ("ce", "dpo")
MODES = ("before", "after", "none")
CONFIG_FILE = "freeprm_prm.json"
OPTIMIZER_FILE = "optimizer.pt"
REFERENCE_DIR = "reference"
FORMAT = "freeprm-implicit-prm-1"


class Rewards(NamedTuple):
    """``token_rewards(..., return_version=True)``: the rewards and the PRM version that computed them."""

    rewards: torch.Tensor  # [B, T] float32
    version: int


def _check_batch(input_ids, attention_mask, response_mask) -> None:
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(t.shape)}")
    if not (input_ids.shape == attention_mask.shape == response_mask.shape):
        raise ValueError(f"input_ids, attention_mask and response_mask must share one [B, T] shape; got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("the batch is empty")
    if input_ids.is_floating_point():
        raise ValueError("input_ids must be integer token ids")
    rm = response_mask.bool()
    if bool(rm[:, 0].any()):
        raise ValueError("response_mask[:, 0] must be False: the first token has no context to score it; "
                         "put the prompt (at least one token) before the response")
    if bool((rm & ~attention_mask.bool()).any()):
        raise ValueError("response_mask marks padding positions (attention_mask == 0)")
    if bool((rm.sum(-1) == 0).any()):
        raise ValueError("every row needs at least one response token (response_mask all False in a row)")


def _check_outcome(outcome, b: int) -> torch.Tensor:
    if not isinstance(outcome, torch.Tensor):
        outcome = torch.as_tensor(outcome)
    if outcome.shape != (b,):
        raise ValueError(f"outcome must be [B]={b} (one label per response), got shape {tuple(outcome.shape)}")
    y = outcome.float()
    if not bool(torch.isfinite(y).all()) or bool(((y < 0) | (y > 1)).any()):
        raise ValueError("outcome must lie in [0, 1] (1 = the verifier accepts the response, 0 = it rejects it)")
    return y


class ImplicitPRM:
    """An implicit PRM for RL: dense token rewards, online CE/DPO updates, a version counter.

    Args:
        model: a Hugging Face causal LM (trained in place), a ``(model, tokenizer)`` pair, or a spec that
            ``freeprm.engine.loading.load_model`` accepts (HF directory, hub id, ``.gguf``, ``"smollm2"``).
        reference: ``"frozen"`` (default, PRIME's): a frozen copy of the initial model is ``pi_ref``;
            ``"policy"``: the caller passes ``ref_logprobs`` (e.g. the RL policy's old log-probs) to every
            ``token_rewards`` / ``update`` call; a model (or spec, or pair): that model, frozen; ``None``:
            reference-free (``log pi_ref = 0``).
        tokenizer: needed for ``granularity="step"``, ``score`` and ``save_pretrained`` when ``model`` is an
            ``nn.Module`` (loaded with the model otherwise).
        beta: reward scale. granularity: ``"token"`` (dense) or ``"step"`` (each step's summed reward on
            its last token; steps split at ``step_delimiter`` in the decoded response).
        lr, grad_clip, weight_decay: AdamW settings of ``update`` (``grad_clip=None``: no clipping).
        mini_batch_size: rows per optimizer step in ``update`` (None: the whole batch, one step).
        loss: ``"ce"`` (PRIME) or ``"dpo"``.
        device, dtype: where the models live (default: CUDA when available, float32); an ``nn.Module`` is
            moved only when they are given.
        impl: kernel dispatch of the log-prob op (``"auto" | "triton" | "torch"``).
        full_logits: the naive ``[B, T, V]`` logits path instead of the chunked LM head (a baseline for
            benchmarks and tests; same results, much more memory).

    ``version`` starts at 0 and increments once per ``update`` call; ``token_rewards(...,
    return_version=True)``, ``step`` and ``score`` report the version their rewards came from.
    """

    def __init__(
        self,
        model,
        reference="frozen",
        *,
        tokenizer=None,
        beta: float = 0.05,
        granularity: str = "token",
        step_delimiter: str = "\n\n",
        lr: float = 1e-6,
        grad_clip: float | None = 10.0,
        mini_batch_size: int | None = None,
        loss: str = "ce",
        weight_decay: float = 0.0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        impl: str = "auto",
        full_logits: bool = False,
    ) -> None:
        if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not isinstance(step_delimiter, str) or not step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
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
        if isinstance(reference, str) and reference in ("frozen", "policy"):
            self.reference_kind = reference
            self.reference = _frozen(copy.deepcopy(self.model)) if reference == "frozen" else None
        elif reference is None:
            self.reference_kind, self.reference = "none", None
        else:
            self.reference_kind = "model"
            ref = reference if isinstance(reference, torch.nn.Module) else \
                load_model(reference, dtype=opts["dtype"], device=self.device)[0]
            self.reference = _frozen(ref.to(self.device))
        self.beta, self.granularity, self.step_delimiter = float(beta), granularity, step_delimiter
        self.lr, self.grad_clip, self.weight_decay = float(lr), grad_clip, float(weight_decay)
        self.mini_batch_size, self.loss, self.impl, self.full_logits = mini_batch_size, loss, impl, full_logits
        self.version = 0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        self._scorer = None

    # ------------------------------------------------------------------------------ log-probs
    def _logprobs(self, model, input_ids, attention_mask, response_mask) -> torch.Tensor:
        if self.full_logits:
            return naive_sequence_logprobs(model, input_ids, attention_mask, response_mask)
        return sequence_logprobs(model, input_ids, attention_mask, response_mask, impl=self.impl)

    def _ref_logprobs(self, input_ids, attention_mask, response_mask, ref_logprobs):
        """``log pi_ref`` ``[B, T]`` (0 off the response), or None when reference-free."""
        if ref_logprobs is not None:
            if self.reference_kind == "none":
                raise ValueError("ref_logprobs given but this PRM is reference-free (reference=None)")
            if not isinstance(ref_logprobs, torch.Tensor) or ref_logprobs.shape != input_ids.shape:
                raise ValueError(f"ref_logprobs must be a [B, T] tensor shaped like input_ids {tuple(input_ids.shape)}")
            return ref_logprobs.to(device=self.device, dtype=torch.float32) * response_mask
        if self.reference_kind == "policy":
            raise ValueError("reference='policy' needs ref_logprobs (the policy's log-probs of the response "
                             "tokens, [B, T]) on every call")
        if self.reference is None:
            return None
        with torch.no_grad():
            return self._logprobs(self.reference, input_ids, attention_mask, response_mask)

    def _inputs(self, input_ids, attention_mask, response_mask):
        _check_batch(input_ids, attention_mask, response_mask)
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
            r = self._to_steps(ids, rm, r)
        return Rewards(r, self.version) if return_version else r

    def step_index(self, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Step index ``[B, T]`` long of each response token (-1 elsewhere), from the decoded response.

        Row ``b``'s response tokens are decoded; their character offsets come from re-tokenizing that
        text with offsets when it gives the same ids (else from incremental decoding); steps are split at
        ``step_delimiter`` and tokens assigned with ``freeprm.engine.steps`` (a token belongs to the step
        that owns its last character).
        """
        if self.tokenizer is None:
            raise ValueError("granularity='step' needs the tokenizer: pass tokenizer= to ImplicitPRM")
        out = torch.full(input_ids.shape, -1, dtype=torch.long)
        ids_cpu, rm_cpu = input_ids.cpu(), response_mask.cpu().bool()
        for b in range(ids_cpu.shape[0]):
            pos = rm_cpu[b].nonzero().flatten()
            resp = ids_cpu[b, pos].tolist()
            text, offsets = self._offsets(resp)
            try:
                spans = split_steps(text, step_delimiter=self.step_delimiter)
            except ValueError:  # whitespace-only response: one step
                spans = [(0, len(text))]
            out[b, pos] = torch.tensor(token_steps(offsets, spans), dtype=torch.long)
        return out.to(input_ids.device)

    def _offsets(self, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        tok = self.tokenizer
        text = tok.decode(ids)
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            if list(enc["input_ids"]) == list(ids):
                return text, [tuple(o) for o in enc["offset_mapping"]]
        offsets, prev = [], 0  # non-canonical tokenization (sampled): prefix decoding, monotone ends
        for k in range(len(ids)):
            end = max(prev, min(len(tok.decode(ids[:k + 1])), len(text)))
            offsets.append((prev, end))
            prev = end
        return text, offsets

    def _to_steps(self, input_ids, response_mask, r) -> torch.Tensor:
        steps = self.step_index(input_ids, response_mask)  # [B, T]
        out = torch.zeros_like(r)
        for b in range(r.shape[0]):
            pos = response_mask[b].nonzero().flatten()
            s = steps[b, pos]
            n_steps = int(s.max()) + 1
            sums = torch.zeros(n_steps, dtype=r.dtype, device=r.device).index_add_(0, s, r[b, pos])
            last = torch.full((n_steps,), -1, dtype=torch.long, device=r.device).scatter_reduce_(
                0, s, torch.arange(len(pos), device=r.device), "amax")
            has = last >= 0
            out[b, pos[last[has]]] = sums[has]
        return out

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
        y = _check_outcome(outcome, b).to(self.device)
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
                loss = self._loss(rewards, y[sl], None if groups is None else groups[sl])
                if loss is None:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norms.append(self._clip())
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

    def _loss(self, rewards, y, groups):
        if self.loss == "ce":
            return losses.ce_loss(rewards, y)
        g = groups if groups is not None else torch.zeros_like(y, dtype=torch.long)
        ci, ri = ((y[:, None] > y[None, :]) & (g[:, None] == g[None, :])).nonzero(as_tuple=True)
        if len(ci) == 0:
            return None
        return losses.dpo_loss(rewards[ci], rewards[ri])

    def _clip(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.grad_clip is None:
            return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))

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
        """A ``freeprm.engine.Scorer`` over this PRM's models (shared objects, so updates show), beta and delimiter."""
        from ..engine.scorer import Scorer

        if self.reference_kind == "policy":
            raise ValueError("score() needs a reference model; with reference='policy' use token_rewards(..., "
                             "ref_logprobs=...)")
        if self.tokenizer is None:
            raise ValueError("score() needs the tokenizer: pass tokenizer= to ImplicitPRM")
        ref = None if self.reference is None else (self.reference, self.tokenizer)
        return Scorer((self.model, self.tokenizer), ref, beta=self.beta, step_delimiter=self.step_delimiter,
                      device=self.device, impl=self.impl, **kwargs)

    def score(self, items: Iterable[Mapping], *, aggregate: str = "min", progress: bool = False) -> list:
        """``freeprm.engine.Scorer.score`` with this PRM (items ``{"prompt", "response"}`` or ``{"prompt", "steps"}``).

        Each ``ScoreResult.meta["prm_version"]`` is the version that computed it.
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
        return {"format": FORMAT, "beta": self.beta, "granularity": self.granularity,
                "step_delimiter": self.step_delimiter, "lr": self.lr, "grad_clip": self.grad_clip,
                "mini_batch_size": self.mini_batch_size, "loss": self.loss, "weight_decay": self.weight_decay,
                "reference": self.reference_kind, "version": self.version}

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

        Also written: ``freeprm_prm.json`` (settings, version), ``optimizer.pt`` (optimizer state, read back
        with ``weights_only=True``) and, with ``reference="frozen"``, the reference in ``reference/``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.reference_kind == "frozen":
            self.reference.save_pretrained(path / REFERENCE_DIR, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path / REFERENCE_DIR)
        torch.save(self.optimizer.state_dict(), path / OPTIMIZER_FILE)
        (path / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2))
        return str(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, reference="saved", **kwargs) -> ImplicitPRM:
        """Load a ``save_pretrained`` directory: weights, settings, version, optimizer state.

        ``reference="saved"`` restores what was saved (the frozen reference from ``reference/``; ``"policy"``;
        ``None``); a ``reference="model"`` PRM must be given its reference again. Keyword arguments override
        the saved settings (``beta``, ``lr``, ``device``, ...).
        """
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise ValueError(f"{path} has no {CONFIG_FILE}; is it an ImplicitPRM.save_pretrained directory?")
        cfg = json.loads(cfg_file.read_text())
        settings = {k: cfg[k] for k in ("beta", "granularity", "step_delimiter", "lr", "grad_clip",
                                         "mini_batch_size", "loss", "weight_decay") if k in cfg}
        settings.update(kwargs)
        frozen_ref = None
        if isinstance(reference, str) and reference == "saved":
            kind = cfg.get("reference", "none")
            if kind == "model":
                raise ValueError("this PRM was saved with a separate reference model; pass reference=<that model>")
            if kind == "frozen":
                frozen_ref = str(path / REFERENCE_DIR)
                reference = None
            else:
                reference = None if kind == "none" else kind
        prm = cls(str(path), reference, **settings)
        if frozen_ref is not None:
            prm.reference = _frozen(load_model(frozen_ref, dtype=next(prm.model.parameters()).dtype,
                                               device=prm.device)[0])
            prm.reference_kind = "frozen"
        opt_file = path / OPTIMIZER_FILE
        if opt_file.is_file():
            prm.optimizer.load_state_dict(torch.load(opt_file, map_location=prm.device, weights_only=True))
        prm.version = int(cfg.get("version", 0))
        return prm


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def auroc(scores: Iterable[float], labels: Iterable[float]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half); nan if one class only."""
    s, y = list(scores), [bool(v) for v in labels]
    pos = sorted(v for v, t in zip(s, y) if t)
    neg = sorted(v for v, t in zip(s, y) if not t)
    if not pos or not neg:
        return float("nan")
    wins = sum(bisect.bisect_left(neg, v) + 0.5 * (bisect.bisect_right(neg, v) - bisect.bisect_left(neg, v))
               for v in pos)
    return wins / (len(pos) * len(neg))


def encode_batch(tokenizer, prompts: list[str], responses: list[str], *, padding_side: str = "right",
                 prompt_format: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, response_mask)``, each ``[B, T]``, for (prompt, response) text pairs.

    Tokenized as the engine's ``Scorer`` does (``freeprm.engine.tokenization.encode``: the prompt through the
    chat template when the tokenizer has one, the response tokenized on its own), so ``token_rewards`` on
    these tensors equals ``score`` on the same texts.
    """
    from ..engine.tokenization import encode

    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses (at least one); got {len(prompts)} and {len(responses)}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    encs = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        try:
            encs.append(encode(tokenizer, p, r, prompt_format))
        except ValueError as e:
            raise ValueError(f"pair {i}: {e}") from None
    t = max(len(e.input_ids) for e in encs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(encs), t), pad, dtype=torch.long)
    am = torch.zeros((len(encs), t), dtype=torch.long)
    rm = torch.zeros((len(encs), t), dtype=torch.bool)
    for b, e in enumerate(encs):
        n = len(e.input_ids)
        o = t - n if padding_side == "left" else 0
        ids[b, o:o + n] = torch.tensor(e.input_ids)
        am[b, o:o + n] = 1
        rm[b, o + e.response_start:o + n] = True
    return ids, am, rm
