"""verl adapter: ``FreePRMRewardManager``, a reward manager that returns dense implicit process rewards.

Interface followed: verl 0.4 / 0.5 (``verl/workers/reward_manager``: ``register(name)`` from
``registry.py``, the ``AbstractRewardManager.__init__(tokenizer, num_examine, compute_score,
reward_fn_key, ...)`` signature, ``__call__(data: DataProto, return_dict=False)`` returning
``reward_tensor [B, T_resp]`` or ``{"reward_tensor", "reward_extra_info"}``). verl builds the manager as
``cls(tokenizer=..., num_examine=..., compute_score=..., reward_fn_key=..., **config.reward_model.reward_kwargs)``,
so our own options (``policy``, ``reference``, ``beta``, ...) come through ``reward_kwargs``.

Registration: importing this module registers the class as ``"freeprm"`` with verl's ``register``
decorator when verl is installed (freeprm does not depend on verl). Import it in your entry script before
verl looks the manager up, then set ``reward_model.reward_manager=freeprm``.

What ``__call__`` reads from ``data`` (verl's ``DataProto``; any object with the same fields works):
``data.batch["prompts"] [B, P]`` (left-padded), ``data.batch["responses"] [B, R]`` (right-padded),
``data.batch["attention_mask"] [B, P + R]``, optionally ``data.batch["input_ids"] [B, P + R]`` (else
``cat(prompts, responses)``), and, for the outcome term only, ``data.non_tensor_batch["reward_model"][i]
["ground_truth"]``, ``data.non_tensor_batch[reward_fn_key][i]`` and ``data.non_tensor_batch["extra_info"][i]``.

What it returns, ``reward_tensor [B, R]`` float32 (0 at padding)::

    dense = beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))      # per response token, on the policy's tokens
    granularity="token":  reward = prm_coef * dense
    granularity="step":   reward[last token of step k] = prm_coef * sum(dense over step k's tokens), else 0
    outcome_coef != 0:    reward[last valid token] += outcome_coef * compute_score(data_source, response_str,
                                                                             ground_truth, extra_info)

The PRM reads the policy's token ids directly, so it must share the policy's tokenizer (checked when
both tokenizers are at hand). Steps (``granularity="step"``) are found in the decoded response text with
``step_delimiter`` and mapped to tokens by the engine's rule (a token belongs to the step owning its last
character). ``reward_extra_info`` (with ``return_dict=True``): ``prm_reward_sum`` (sum of the dense rewards
of each response, i.e. its last Q value), ``prm_num_tokens``, ``outcome_score`` when the outcome term is on,
and ``prm_version`` when the PRM counts its updates (``ImplicitPRM.version``).
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict

import torch

from ..engine.steps import split_steps, token_steps
from ._common import check_reward_model, dense_rewards, model_version

GRANULARITIES = ("token", "step")
_SCORERS: dict = {}  # verl builds a train and a validation manager: share the loaded models


class FreePRMRewardManager:
    """Dense implicit-PRM rewards for verl (see the module docstring for the formulas and fields).

    Args:
        tokenizer: the policy's tokenizer (verl passes it); decodes responses for steps / outcome / printing.
        num_examine: how many responses to print per call (verl: 0 for training, 1 for validation).
        compute_score: verl's outcome function ``(data_source, solution_str, ground_truth, extra_info) -> float
            | dict``; used only when ``outcome_coef != 0``.
        reward_fn_key: the ``non_tensor_batch`` key holding each row's data source.
        prm: a ``freeprm.rl.ImplicitPRM`` or ``freeprm.engine.Scorer``; or give ``policy`` (and ``reference``,
            ``beta``, ``dtype``, ``device``) to build a Scorer here (what verl's ``reward_kwargs`` can carry).
        granularity: ``"token"`` (dense) or ``"step"`` (each step's reward on its last token).
        prm_coef / outcome_coef: weights of the implicit rewards and of the outcome score.
        Other keyword arguments verl passes (``max_resp_len``, ``overlong_buffer_cfg``, ...) are accepted and ignored.
    """

    def __init__(self, tokenizer=None, num_examine: int = 0, compute_score=None, reward_fn_key: str = "data_source",
                 *, prm=None, policy=None, reference=None, beta: float = 1.0, step_delimiter: str = "\n\n",
                 granularity: str = "token", prm_coef: float = 1.0, outcome_coef: float = 0.0,
                 dtype: str = "float32", device: str | None = None, **unused) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if outcome_coef and compute_score is None:
            raise ValueError("outcome_coef != 0 needs compute_score (verl passes its default one; outside verl give a "
                             "function (data_source, solution_str, ground_truth, extra_info) -> float)")
        if granularity == "step" and not step_delimiter:
            raise ValueError("granularity='step' needs a non-empty step_delimiter")
        if prm is None:
            if policy is None:
                raise ValueError("give prm= (an ImplicitPRM or Scorer) or policy= (a model spec; in verl set "
                                 "reward_model.reward_kwargs.policy)")
            prm = _cached_scorer(policy, reference, beta=beta, step_delimiter=step_delimiter, dtype=dtype, device=device)
        check_reward_model(prm)
        _check_tokenizers(tokenizer, getattr(prm, "tokenizer", None))
        self.tokenizer, self.num_examine = tokenizer, int(num_examine)
        self.compute_score, self.reward_fn_key = compute_score, reward_fn_key
        self.prm, self.granularity, self.step_delimiter = prm, granularity, step_delimiter
        self.prm_coef, self.outcome_coef = float(prm_coef), float(outcome_coef)

    def __call__(self, data, return_dict: bool = False):
        batch = data.batch
        prompts, responses, am = batch["prompts"], batch["responses"], batch["attention_mask"]
        b, p = prompts.shape
        r = responses.shape[1]
        if am.shape != (b, p + r):
            raise ValueError(f"attention_mask is {tuple(am.shape)}, expected [B, P + R] = [{b}, {p + r}]")
        input_ids = batch["input_ids"] if "input_ids" in batch.keys() else torch.cat([prompts, responses], dim=1)
        if (am[:, :p].sum(1) == 0).any():
            raise ValueError("a row has no prompt tokens: the first response token would have no context")
        resp_valid = am[:, p:].bool()  # [B, R]
        response_mask = torch.zeros_like(am, dtype=torch.bool)
        response_mask[:, p:] = resp_valid
        dense = dense_rewards(self.prm, input_ids, am, response_mask)[:, p:].float().cpu()  # [B, R]
        resp_valid = resp_valid.cpu()
        dense = dense * resp_valid
        lengths = resp_valid.sum(1)  # [B]
        resp_cpu = responses.cpu()

        if self.granularity == "step":
            reward = torch.zeros_like(dense)
            for i in range(b):
                n = int(lengths[i])
                if n:
                    reward[i, :n] = _steps_on_last_token(dense[i, :n], resp_cpu[i, :n].tolist(), self.tokenizer,
                                                         self.step_delimiter)
        else:
            reward = dense.clone()
        reward = self.prm_coef * reward

        extra = defaultdict(list)
        extra["prm_reward_sum"] = dense.sum(1).tolist()
        extra["prm_num_tokens"] = lengths.tolist()
        version = model_version(self.prm)
        if version is not None:
            extra["prm_version"] = [version] * b
        texts = None
        if self.outcome_coef or self.num_examine:
            texts = [self._decode(resp_cpu[i, :int(lengths[i])]) for i in range(b)]
        if self.outcome_coef:
            for i in range(b):
                score = self._outcome(data, i, texts[i])
                extra["outcome_score"].append(score)
                if lengths[i]:
                    reward[i, int(lengths[i]) - 1] += self.outcome_coef * score
        for i in range(min(self.num_examine, b)):
            prompt_ids = prompts[i][am[i, :p].bool()].cpu()
            print("[prompt]", self._decode(prompt_ids))
            print("[response]", texts[i])
            print("[prm_reward_sum]", extra["prm_reward_sum"][i])
        reward_tensor = reward.to(responses.device)
        if return_dict:
            return {"reward_tensor": reward_tensor, "reward_extra_info": dict(extra)}
        return reward_tensor

    def _decode(self, ids) -> str:
        if self.tokenizer is None:
            raise ValueError("this needs the policy's tokenizer (pass tokenizer=)")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _outcome(self, data, i: int, response_str: str) -> float:
        nt = getattr(data, "non_tensor_batch", {}) or {}
        rm = nt.get("reward_model")
        ground_truth = rm[i].get("ground_truth") if rm is not None else None
        data_source = nt[self.reward_fn_key][i] if self.reward_fn_key in nt else None
        extra_info = nt["extra_info"][i] if "extra_info" in nt else None
        out = self.compute_score(data_source=data_source, solution_str=response_str, ground_truth=ground_truth,
                                 extra_info=extra_info)
        if isinstance(out, dict):
            out = out.get("score", out.get("reward"))
        return float(out)


def _steps_on_last_token(dense: torch.Tensor, ids: list[int], tokenizer, delimiter: str) -> torch.Tensor:
    """[n] -> [n]: each step's summed reward on its last token (steps found in the decoded text)."""
    if tokenizer is None:
        raise ValueError("granularity='step' needs the policy's tokenizer (pass tokenizer=)")
    text, ends = _token_ends(ids, tokenizer)
    out = torch.zeros_like(dense)
    if not text.strip():
        out[-1] = dense.sum()
        return out
    spans = split_steps(text, step_delimiter=delimiter)
    offsets = [(ends[k - 1] if k else 0, e) for k, e in enumerate(ends)]
    steps = torch.tensor(token_steps(offsets, spans), dtype=torch.long)  # [n]
    sums = torch.zeros(len(spans), dtype=dense.dtype).index_add_(0, steps, dense)
    last = torch.full((len(spans),), -1, dtype=torch.long).scatter_reduce_(
        0, steps, torch.arange(len(ids)), reduce="amax")
    has = last >= 0
    out[last[has]] = sums[has]
    return out


def _token_ends(ids: list[int], tokenizer) -> tuple[str, list[int]]:
    """The decoded text of ``ids`` and each token's end character in it.

    Fast path: per-token decodes that concatenate to the full decode (true for byte-level BPE unless a
    character is split across tokens). Otherwise each end is the length of the decoded prefix that
    agrees with the full text (a token inside a split character gets the previous end).
    """
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text = tokenizer.decode(ids, **kw)
    pieces = [tokenizer.decode([t], **kw) for t in ids]
    if "".join(pieces) == text:
        ends, e = [], 0
        for piece in pieces:
            e += len(piece)
            ends.append(e)
        return text, ends
    ends = []
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[:k + 1], **kw)
        ends.append(len(os.path.commonprefix([prefix, text])))
    ends = [max(ends[:k + 1]) for k in range(len(ends))]
    return text, ends


def _check_tokenizers(policy_tok, prm_tok) -> None:
    if policy_tok is None or prm_tok is None or policy_tok is prm_tok:
        return
    get_a, get_b = getattr(policy_tok, "get_vocab", None), getattr(prm_tok, "get_vocab", None)
    if callable(get_a) and callable(get_b) and get_a() != get_b():
        raise ValueError("the PRM's tokenizer differs from the policy's: FreePRMRewardManager scores the policy's token "
                         "ids directly, so the PRM must share the policy's vocabulary (initialise it from the policy, "
                         "or use the TRL / server adapters, which re-tokenize text)")


def _cached_scorer(policy, reference, **kwargs):
    from ..engine import Scorer

    key = (str(policy), str(reference), tuple(sorted(kwargs.items())))
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(policy, reference, **kwargs)
    return _SCORERS[key]


def _register_with_verl() -> None:
    global FreePRMRewardManager
    if importlib.util.find_spec("verl") is None:
        return
    try:
        from verl.workers.reward_manager import register
    except Exception:  # noqa: BLE001 - an older/newer verl without the registry: the class still works directly
        return
    FreePRMRewardManager = register("freeprm")(FreePRMRewardManager)


_register_with_verl()
