"""verl adapter: ``FreePRMRewardManager``, one class for verl's two reward-manager interfaces.

Import it as ``freeprm.integrations.verl`` (that module re-exports this one with absolute imports, so verl
can also load it by file path). Versions: ``check_verl_version``; tested with verl 0.5.0 and 0.9.1.

**verl 0.4 / 0.5** (``verl/workers/reward_manager``): verl builds the manager as
``cls(tokenizer=..., num_examine=..., compute_score=..., reward_fn_key=..., **config.reward_model.reward_kwargs)``
and calls ``__call__(data: DataProto, return_dict=False)`` on the whole batch, which returns
``reward_tensor [B, T_resp]`` or ``{"reward_tensor", "reward_extra_info"}``: dense rewards.

**verl 0.9** (the reward loop, ``verl/experimental/reward_loop/reward_manager``): verl builds it as
``cls(config=..., tokenizer=..., compute_score=..., reward_router_address=..., reward_model_tokenizer=...)``
(no ``reward_kwargs``: our settings are read from ``config``, see ``settings_from_config``) and awaits
``run_single(data)`` once per sample; each returns ``{"reward_score": float, "reward_extra_info": {...}}``
and verl puts the float on the response's last valid token (``assemble_rm_scores``). So in 0.9 the reward
is **one number per response**: ``prm_coef * aggregate + outcome_coef * outcome`` with ``aggregate``
``"sum"`` (the sum of the dense token rewards, i.e. the response's implicit reward ``R = beta * sum log
pi/pi_ref``, default) or ``"min"`` (the minimum step reward). Concurrent ``run_single`` calls of one event
loop are scored in one forward pass (in a worker thread, so the loop keeps running).

Registration: importing the module registers the class as ``"freeprm"`` in every registry the installed
verl has (``verl.workers.reward_manager`` and ``verl.experimental.reward_loop.reward_manager``; freeprm
does not depend on verl). Or let verl import it: ``reward.reward_manager.source=importlib``,
``reward.reward_manager.module.path=pkg://freeprm.integrations.verl`` (or the file's path),
``reward.reward_manager.name=FreePRMRewardManager``.

What it reads from ``data`` (verl's ``DataProto``; any object with the same fields works):
``data.batch["prompts"] [B, P]`` (left-padded), ``data.batch["responses"] [B, R]`` (right-padded),
``data.batch["attention_mask"] [B, P + R]``, optionally ``data.batch["input_ids"] [B, P + R]`` (else
``cat(prompts, responses)``), and, for the outcome term only, ``data.non_tensor_batch["reward_model"][i]
["ground_truth"]``, ``data.non_tensor_batch[reward_fn_key][i]`` and ``data.non_tensor_batch["extra_info"][i]``.

Dense rewards (0.4 / 0.5), ``reward_tensor [B, R]`` float32 (0 at padding)::

    dense = beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))      # per response token, on the policy's tokens
    granularity="token":  reward = prm_coef * dense
    granularity="step":   reward[last token of step k] = prm_coef * sum(dense over step k's tokens), else 0
    outcome_coef != 0:    reward[last valid token] += outcome_coef * compute_score(data_source, response_str,
                                                                             ground_truth, extra_info)

The PRM reads the policy's token ids directly, so it must share the policy's tokenizer (checked when
both tokenizers are at hand); the EOS token, when the policy generated it, is a response token like any
other (in the last step). Steps (``granularity="step"``, ``aggregate="min"``) are found in the decoded
response text with ``step_delimiter`` and mapped to tokens by the engine's rule (a token belongs to the step
owning its last character). ``reward_extra_info``: ``prm_reward_sum`` (sum of the dense rewards of each
response, i.e. its last Q value), ``prm_num_tokens``, ``outcome_score`` when the outcome term is on, and
``prm_version`` when the PRM counts its updates (``ImplicitPRM.version``).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings
from collections import defaultdict

import torch

from freeprm.config import DEFAULT_BETA, DEFAULT_STEP_DELIMITER, check_beta, normalize_step_delimiter
from freeprm.engine.steps import GRANULARITIES, step_rewards_on_last_token, step_sums
from freeprm.integrations._common import check_reward_model, dense_rewards, model_version

AGGREGATES = ("sum", "min")  # verl 0.9: one number per response
TESTED_VERL = ("0.5.0", "0.9.1")
_SCORERS: dict = {}  # verl builds a train and a validation manager: share the loaded models
_OWN_KEYS = ("prm", "policy", "reference", "beta", "step_delimiter", "granularity", "aggregate", "prm_coef",
             "outcome_coef", "dtype", "device")


def check_verl_version(version: str) -> str:
    """Which interface verl ``version`` has: ``"reward_manager"`` (0.4 / 0.5: ``__call__`` on the batch) or
    ``"reward_loop"`` (0.9: ``run_single``). ``ValueError`` for a version freeprm does not support.

    0.6 - 0.8 were not tested: both interfaces are offered (the class registers wherever verl has a registry).
    """
    try:
        parts = [int(x) for x in str(version).split("+")[0].split(".")[:2]]
        major, minor = parts[0], parts[1] if len(parts) > 1 else 0
    except (ValueError, IndexError):
        raise ValueError(f"cannot read the verl version {version!r}") from None
    if major == 0 and minor in (4, 5):
        return "reward_manager"
    if major == 0 and 6 <= minor <= 9:
        return "reward_loop" if minor == 9 else "reward_manager+reward_loop"
    raise ValueError(f"verl {version} is not supported by freeprm's reward manager: it follows verl 0.4 / 0.5 "
                     f"(verl.workers.reward_manager) and verl 0.9 (the reward loop), tested with "
                     f"{' and '.join(TESTED_VERL)}; install one of those (e.g. pip install 'verl==0.5.0' or "
                     "'verl>=0.9,<0.10')")


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    getter = getattr(cfg, "get", None)
    return getter(key, default) if callable(getter) else getattr(cfg, key, default)


def settings_from_config(config) -> dict:
    """freeprm's manager settings from a verl 0.9 config, which does not pass ``reward_kwargs``.

    Read, later keys overriding earlier ones: ``config.reward_model.reward_kwargs`` (the 0.4 / 0.5 place;
    verl 0.9 migrates it to the next one), ``config.reward.reward_kwargs`` and a ``config.freeprm`` section.
    Only freeprm's own keys are taken (``policy``, ``reference``, ``beta``, ``granularity``, ``aggregate``, ...);
    others there (e.g. DAPO's ``overlong_buffer_cfg``) are left alone.
    """
    out: dict = {}
    for section in (_get(_get(config, "reward_model"), "reward_kwargs"), _get(_get(config, "reward"), "reward_kwargs"),
                    _get(config, "freeprm")):
        if section is None:
            continue
        for key in _OWN_KEYS:
            value = _get(section, key)
            if value is not None:
                out[key] = value
    return out


class FreePRMRewardManager:
    """Dense implicit-PRM rewards for verl 0.4 / 0.5, one reward per response for verl 0.9 (module docstring).

    Args:
        tokenizer: the policy's tokenizer (verl passes it); decodes responses for steps / outcome / printing.
        num_examine: how many responses to print per call (verl 0.4 / 0.5: 0 for training, 1 for validation).
        compute_score: verl's outcome function ``(data_source, solution_str, ground_truth, extra_info) -> float
            | dict`` (may be ``async`` in verl 0.9); used only when ``outcome_coef != 0``.
        reward_fn_key: the ``non_tensor_batch`` key holding each row's data source.
        config: verl 0.9's config; settings not given as arguments are read from it (``settings_from_config``).
        prm: a ``freeprm.rl.ImplicitPRM`` or ``freeprm.engine.Scorer``; or give ``policy`` (and ``reference``,
            ``beta``, ``dtype``, ``device``) to build a Scorer here (what verl's ``reward_kwargs`` can carry).
        granularity: ``"token"`` (dense) or ``"step"`` (each step's reward on its last token); verl 0.4 / 0.5.
        aggregate: verl 0.9's one number per response: ``"sum"`` of the dense rewards or ``"min"`` step reward.
        prm_coef / outcome_coef: weights of the implicit rewards and of the outcome score.
        Other keyword arguments verl passes (``max_resp_len``, ``reward_router_address``, ...) are ignored.
    """

    def __init__(self, tokenizer=None, num_examine: int = 0, compute_score=None, reward_fn_key: str | None = None,
                 *, config=None, prm=None, policy=None, reference=None, beta: float | None = None,
                 step_delimiter: str | None = None, granularity: str | None = None, aggregate: str | None = None,
                 prm_coef: float | None = None, outcome_coef: float | None = None, dtype: str | None = None,
                 device: str | None = None, **unused) -> None:
        given = {k: v for k, v in dict(prm=prm, policy=policy, reference=reference, beta=beta,
                                       step_delimiter=step_delimiter, granularity=granularity, aggregate=aggregate,
                                       prm_coef=prm_coef, outcome_coef=outcome_coef, dtype=dtype,
                                       device=device).items() if v is not None}
        opts = {"beta": DEFAULT_BETA, "step_delimiter": DEFAULT_STEP_DELIMITER, "granularity": "token",
                "aggregate": "sum", "prm_coef": 1.0, "outcome_coef": 0.0, "dtype": "float32",
                **settings_from_config(config), **given}
        if reward_fn_key is None:
            reward_fn_key = _get(_get(config, "data"), "reward_fn_key", "data_source") or "data_source"
        granularity, aggregate = opts["granularity"], opts["aggregate"]
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if opts["outcome_coef"] and compute_score is None:
            raise ValueError("outcome_coef != 0 needs compute_score (verl passes its default one; outside verl give a "
                             "function (data_source, solution_str, ground_truth, extra_info) -> float)")
        # the one delimiter rule (freeprm.config): "" or None = no delimiter, the whole response is one step
        opts["step_delimiter"] = normalize_step_delimiter(opts["step_delimiter"])
        prm = opts.get("prm")
        if prm is None:
            if opts.get("policy") is None:
                where = ("reward.reward_kwargs.policy (or reward_model.reward_kwargs.policy, or freeprm.policy)"
                         if config is not None else "reward_model.reward_kwargs.policy")
                raise ValueError(f"give prm= (an ImplicitPRM or Scorer) or policy= (a model spec; in verl set {where})")
            prm = _cached_scorer(opts["policy"], opts.get("reference"), beta=check_beta(opts["beta"]),
                                 step_delimiter=opts["step_delimiter"], dtype=opts["dtype"], device=opts.get("device"))
        check_reward_model(prm)
        _check_tokenizers(tokenizer, getattr(prm, "tokenizer", None))
        self.config, self.tokenizer, self.num_examine = config, tokenizer, int(num_examine)
        self.compute_score, self.reward_fn_key = compute_score, reward_fn_key
        self.prm, self.granularity, self.step_delimiter = prm, granularity, opts["step_delimiter"]
        self.aggregate = aggregate
        self.prm_coef, self.outcome_coef = float(opts["prm_coef"]), float(opts["outcome_coef"])
        self._pending: list = []  # verl 0.9: run_single calls waiting to be scored together
        self._forward_lock = threading.Lock()  # one forward at a time when several flushes overlap

    def __getstate__(self) -> dict:  # verl 0.5 may pickle the manager (launch_reward_fn_async): no lock, no queue
        state = dict(self.__dict__)
        state.pop("_forward_lock", None)
        state["_pending"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._forward_lock = threading.Lock()

    # ------------------------------------------------------------------ verl 0.4 / 0.5
    def __call__(self, data, return_dict: bool = False):
        batch = data.batch
        prompts, responses, am = batch["prompts"], batch["responses"], batch["attention_mask"]
        input_ids = batch["input_ids"] if "input_ids" in batch.keys() else None
        dense, lengths = self._dense(prompts, responses, am, input_ids)
        b, p = prompts.shape
        resp_cpu = responses.cpu()
        if self.granularity == "step":
            if self.tokenizer is None:
                raise ValueError("step rewards need the policy's tokenizer (pass tokenizer=)")
            valid = torch.arange(dense.shape[1])[None, :] < lengths[:, None]  # [B, R]
            reward = step_rewards_on_last_token(dense, resp_cpu, valid, self.tokenizer,
                                                step_delimiter=self.step_delimiter)
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
                score = _as_float(self._call_outcome(data, i, texts[i]))
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

    def _dense(self, prompts, responses, am, input_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense rewards ``[B, R]`` (fp32 CPU, 0 at padding) and the valid response lengths ``[B]``."""
        b, p = prompts.shape
        r = responses.shape[1]
        if am.shape != (b, p + r):
            raise ValueError(f"attention_mask is {tuple(am.shape)}, expected [B, P + R] = [{b}, {p + r}]")
        if input_ids is None:
            input_ids = torch.cat([prompts, responses], dim=1)
        if (am[:, :p].sum(1) == 0).any():
            raise ValueError("a row has no prompt tokens: the first response token would have no context")
        resp_valid = am[:, p:].bool()  # [B, R]
        response_mask = torch.zeros_like(am, dtype=torch.bool)
        response_mask[:, p:] = resp_valid
        dense = dense_rewards(self.prm, input_ids, am, response_mask)[:, p:].float().cpu()  # [B, R]
        resp_valid = resp_valid.cpu()
        return dense * resp_valid, resp_valid.sum(1)

    # ------------------------------------------------------------------ verl 0.9 (reward loop)
    async def run_single(self, data) -> dict:
        """verl 0.9: ``{"reward_score": float, "reward_extra_info": {...}}`` for the last sample of ``data``.

        ``reward_score = prm_coef * aggregate(response) + outcome_coef * outcome``. Calls that wait together on
        one event loop share one forward pass, run in a worker thread.
        """
        import asyncio

        data = data[-1:] if len(data) > 1 else data  # multi-sequence outputs: verl scores the last one
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((data, fut))
        if len(self._pending) == 1:
            loop.create_task(self._flush())
        prm_score, info = await fut
        score = self.prm_coef * prm_score
        if self.outcome_coef:
            text = await loop.run_in_executor(None, self._decode_valid_response, data)
            outcome = self._call_outcome(data, 0, text)
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
            outcome = _as_float(outcome)
            info["outcome_score"] = outcome
            score += self.outcome_coef * outcome
        return {"reward_score": float(score), "reward_extra_info": info}

    async def _flush(self) -> None:
        import asyncio

        await asyncio.sleep(0)  # let the other run_single calls of this gather() queue up
        pending, self._pending = self._pending, []
        try:
            outs = await asyncio.get_running_loop().run_in_executor(None, self._score_rows_locked,
                                                                    [d for d, _ in pending])
        except BaseException as e:  # noqa: BLE001 - every waiting call gets the error
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), out in zip(pending, outs):
            if not fut.done():
                fut.set_result(out)

    def _score_rows_locked(self, datas: list) -> list[tuple[float, dict]]:
        with self._forward_lock:
            return self._score_rows(datas)

    def _score_rows(self, datas: list) -> list[tuple[float, dict]]:
        """One forward over the single-sample DataProtos ``datas``: (aggregate, extra info) per sample."""
        rows = []
        for d in datas:
            batch = d.batch
            p_len = batch["prompts"].shape[-1]
            am = batch["attention_mask"].reshape(-1)
            prompt = batch["prompts"].reshape(-1)[am[:p_len].bool()]
            response = batch["responses"].reshape(-1)[am[p_len:].bool()]
            rows.append((prompt.cpu(), response.cpu()))
        b = len(rows)
        pl, rl = max(len(x) for x, _ in rows), max(max(len(y) for _, y in rows), 1)
        prompts = torch.zeros(b, pl, dtype=torch.long)
        responses = torch.zeros(b, rl, dtype=torch.long)
        am = torch.zeros(b, pl + rl, dtype=torch.long)
        for i, (x, y) in enumerate(rows):  # verl layout: prompts left-padded, responses right-padded
            prompts[i, pl - len(x):], responses[i, :len(y)] = x, y
            am[i, pl - len(x):pl + len(y)] = 1
        dense, lengths = self._dense(prompts, responses, am)
        version = model_version(self.prm)
        out = []
        for i in range(b):
            n = int(lengths[i])
            total = float(dense[i, :n].sum())
            info = {"prm_reward_sum": total, "prm_num_tokens": n}
            agg = total
            if self.aggregate == "min":  # the key on every sample: verl stacks each key over all of them
                if n:
                    sums = _step_sums(dense[i, :n], responses[i, :n].tolist(), self.tokenizer, self.step_delimiter)
                    agg = float(min(sums)) if sums else total
                info["prm_min_step"] = agg
            if version is not None:
                info["prm_version"] = version
            out.append((agg, info))
        return out

    @classmethod
    def assemble_rm_scores(cls, data, scores: list[float]) -> torch.Tensor:
        """verl 0.9: ``rm_scores [B, R]``, each score on its response's last valid token, 0 elsewhere."""
        p = data.batch["prompts"].size(1)
        valid = data.batch["attention_mask"][:, p:].sum(dim=1)
        rm = torch.zeros_like(data.batch["responses"], dtype=torch.float32)
        rows = torch.arange(rm.size(0), device=rm.device)
        rm[rows, (valid - 1).clamp(min=0)] = torch.tensor([float(x) for x in scores], device=rm.device)
        return rm

    # ------------------------------------------------------------------ shared
    def _decode_valid_response(self, data) -> str:
        batch = data.batch
        p_len = batch["prompts"].shape[-1]
        am = batch["attention_mask"].reshape(-1)
        return self._decode(batch["responses"].reshape(-1)[am[p_len:].bool()].cpu())

    def _decode(self, ids) -> str:
        if self.tokenizer is None:
            raise ValueError("this needs the policy's tokenizer (pass tokenizer=)")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _call_outcome(self, data, i: int, response_str: str):
        nt = getattr(data, "non_tensor_batch", {}) or {}
        rm = nt.get("reward_model")
        ground_truth = rm[i].get("ground_truth") if rm is not None else None
        data_source = nt[self.reward_fn_key][i] if self.reward_fn_key in nt else None
        extra_info = nt["extra_info"][i] if "extra_info" in nt else None
        return self.compute_score(data_source=data_source, solution_str=response_str, ground_truth=ground_truth,
                                  extra_info=extra_info)


def _as_float(out) -> float:
    if isinstance(out, dict):
        out = out.get("score", out.get("reward"))
    return float(out)


def _step_sums(dense: torch.Tensor, ids: list[int], tokenizer, delimiter: str) -> list[float]:
    """[n] -> the summed reward of each step of the decoded response that owns a token, in order."""
    sums, _ = step_sums(dense, ids, tokenizer, step_delimiter=delimiter)
    return [float(x) for x in sums]


def _check_tokenizers(policy_tok, prm_tok) -> None:
    if policy_tok is None or prm_tok is None or policy_tok is prm_tok:
        return
    get_a, get_b = getattr(policy_tok, "get_vocab", None), getattr(prm_tok, "get_vocab", None)
    if callable(get_a) and callable(get_b) and get_a() != get_b():
        raise ValueError("the PRM's tokenizer differs from the policy's: FreePRMRewardManager scores the policy's token "
                         "ids directly, so the PRM must share the policy's vocabulary (initialise it from the policy, "
                         "or use the TRL / server adapters, which re-tokenize text)")


def _cached_scorer(policy, reference, **kwargs):
    from freeprm.engine import Scorer

    key = (str(policy), str(reference), tuple(sorted(kwargs.items())))
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(policy, reference, **kwargs)
    return _SCORERS[key]


REGISTRIES = ("verl.workers.reward_manager", "verl.experimental.reward_loop.reward_manager")
registered_in: list[str] = []  # the registries that now hold "freeprm" (for tests and error messages)


def _register_with_verl() -> None:
    """Register the class as ``"freeprm"`` in every registry of the installed verl (none when verl is absent)."""
    if importlib.util.find_spec("verl") is None:
        return
    try:
        import verl

        version = getattr(verl, "__version__", None)
    except Exception as e:  # noqa: BLE001 - a broken verl install: say so, keep the class usable directly
        warnings.warn(f"freeprm: importing verl failed ({type(e).__name__}: {e}); FreePRMRewardManager is not "
                      "registered with verl", RuntimeWarning, stacklevel=2)
        return
    if version is not None:
        try:
            check_verl_version(version)
        except ValueError as e:
            warnings.warn(f"freeprm: {e}", RuntimeWarning, stacklevel=2)
            return
    for name in REGISTRIES:
        try:
            register = importlib.import_module(name).register
        except Exception:  # noqa: BLE001 - this verl has no such registry (0.4/0.5: no reward loop)
            continue
        register("freeprm")(FreePRMRewardManager)
        registered_in.append(name)


_register_with_verl()
