"""Step-level search guided by an implicit PRM: best-of-N, beam search, DVTS; ``search()`` is the public entry.

Every prompt has its own pool of candidates (never shared across prompts); all live candidates of all prompts are
generated and scored together, one step at a time (``generation.py``, ``incremental.py``). After each step the
partial solutions of a pool are ranked by ``aggregate`` (``min`` / ``last`` / ``mean`` / ``sum`` of step rewards,
or ``q_*`` of Q values; ties: the earlier candidate; NaN never wins), then, per ``method``:

* ``best_of_n``: ``n`` independent candidates, no pruning; each runs until EOS, the length limit or the step budget.
* ``beam``: ``n`` live candidates; keep the best ``n // beam_width`` live ones and fork each into ``beam_width``
  children. Candidates that finish (EOS / length) leave the beam for the finished list; the search of a prompt ends
  when ``n`` have finished, none is live, or the step budget is spent.
* ``dvts`` (diverse verifier tree search): ``n // beam_width`` independent subtrees of ``beam_width`` candidates; in
  each subtree keep only its best live candidate and fork it into ``beam_width`` children; a subtree ends when none
  of its candidates is live.

The final candidates of a prompt are the finished ones and those still live when the step budget ran out (status
``"budget"``); the pick is the best of them under ``aggregate``. ``max_steps`` bounds the steps per candidate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from ..config import UNSET, merge_config
from .defaults import AGGREGATIONS, DEFAULT_AGGREGATE, DEFAULT_STEP_DELIMITER, SCORING_OPTIONS, ScoringConfig
from .generation import StepOutput, check_delimiter
from .incremental import Candidate, IncrementalScorer

METHODS = ("best_of_n", "beam", "dvts")


@dataclass(frozen=True)
class SearchConfig:
    """What a search does (the scoring itself is the ``Scorer``'s: models, beta, prompt format, dtype).

    n: candidates per prompt (best-of-N's N; the beam's size; DVTS: subtrees x beam_width).
    beam_width: children per kept candidate (beam, DVTS); must divide ``n``.
    max_steps: the step budget: steps per candidate (>= 1).
    step_delimiter: what ends a step (see ``generation.py`` for the exact rule).
    aggregate: how partial solutions are ranked (``engine.AGGREGATIONS``).
    max_step_tokens / max_tokens: sampled tokens per step / response tokens per candidate.
    temperature / top_p / seed: sampling.
    stop: strings that finish a candidate: after a step whose text contains one, the candidate is done (status
        ``"stop"``; the step is kept whole), e.g. ``("The answer is",)`` for prompts that end with that line.
    scoring: None (default): the PRM's own settings (a trained PRM directory's recorded beta, reference and prompt
        format, ``freeprm_prm.json``, else the defaults), resolved by the ``Scorer``; or a
        ``freeprm.config.ScoringConfig`` whose beta, reference, prompt format, dtype and max_length are passed as
        given. Either way the step split and the aggregation are ``step_delimiter`` and ``aggregate`` above (one
        source), and a ``step_pattern`` is refused (steps end at the delimiter while they are generated).
    """

    method: str = "beam"
    n: int = 8
    beam_width: int = 4
    max_steps: int = 10
    step_delimiter: str = DEFAULT_STEP_DELIMITER
    aggregate: str = DEFAULT_AGGREGATE
    max_step_tokens: int = 128
    max_tokens: int = 1024
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    scoring: ScoringConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("n", "beam_width", "max_steps", "max_step_tokens", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                what = {"max_steps": " (the step budget)", "beam_width": " (children per kept candidate)"}.get(name, "")
                raise ValueError(f"{name}{what} must be an integer >= 1, got {v!r}")
        if self.method != "best_of_n" and self.n % self.beam_width:
            raise ValueError(f"{self.method}: n={self.n} must be a multiple of beam_width={self.beam_width} "
                             f"(n // beam_width candidates are kept, each forked into beam_width)")
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string (e.g. '\\n\\n')")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {self.aggregate!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)) or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")
        if self.scoring is None:
            return
        if not isinstance(self.scoring, ScoringConfig):
            raise ValueError(f"scoring must be a freeprm.config.ScoringConfig or None, got {type(self.scoring).__name__}")
        if self.scoring.step_pattern is not None:
            raise ValueError("search splits steps at step_delimiter while it generates them; a step_pattern is not "
                             "supported (remove it from the scoring config)")
        object.__setattr__(self, "scoring", self.scoring.replace(step_delimiter=self.step_delimiter,
                                                                 aggregate=self.aggregate))

    def to_dict(self) -> dict:
        """The search options as plain JSON (the scoring config is identified separately, with its models)."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) if f.name != "scoring" for v in [getattr(self, f.name)]}


@dataclass
class SearchResult:
    """The outcome of one prompt's search.

    candidates: the final candidates, each ``{"text", "steps", "step_rewards", "score", "status", "num_tokens",
    "cut", "id", "token_ids", "step_ends"}`` (``status``: eos | length | budget; ``cut[k]``: step k ended at the
    per-step token limit; ``token_ids``: the scored response ids, ``step_ends``: the cumulative token count at
    the end of each step, so ``Scorer`` can re-score exactly these ids and steps).
    best: index of the pick in ``candidates`` (None when none has a step). trace: one entry per search step.
    """

    prompt: str
    candidates: list[dict]
    best: int | None
    trace: list[dict]
    generated_tokens: int  # tokens sampled for this prompt (all candidates, kept or not)
    scored_tokens: int  # tokens the PRM ran incrementally for this prompt
    steps: int  # search steps run
    aggregation: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def best_text(self) -> str | None:
        return None if self.best is None else self.candidates[self.best]["text"]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "best": self.best, "best_text": self.best_text,
                "best_score": None if self.best is None else self.candidates[self.best]["score"],
                "aggregation": self.aggregation, "candidates": self.candidates, "trace": self.trace,
                "generated_tokens": self.generated_tokens, "scored_tokens": self.scored_tokens, "steps": self.steps,
                **({"meta": self.meta} if self.meta else {})}


def pick_best(scores: Sequence[float | None]) -> int | None:
    """Index of the highest score; ties: the lowest index; NaN never wins over a number; None if no score."""
    ok = [i for i, s in enumerate(scores) if s is not None]
    if not ok:
        return None
    return max(ok, key=lambda i: (scores[i] == scores[i], scores[i], -i))


def step_texts(tokenizer, ids: Sequence[int], ends: Sequence[int]) -> list[str]:
    """The text of each step: the growth of ``decode(ids[:end])`` from one step end to the next (so the steps join to
    the decoded response even where a character's bytes straddle a step boundary); ``decode`` of the step's own ids
    where a prefix does not decode to a prefix of the next."""
    out, prev, a = [], "", 0
    for e in ends:
        cur = tokenizer.decode(list(ids[:e]))
        out.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode(list(ids[a:e])))
        prev, a = cur, e
    return out


def _rank(cands: list[Candidate], aggregate: str) -> list[Candidate]:
    """Best first under ``aggregate`` (stable: equal scores keep their order; NaN last)."""
    def key(c: Candidate):
        s = c.score(aggregate)
        return (0, 0.0) if s != s else (1, s)
    return sorted(cands, key=key, reverse=True)


@dataclass
class _Pool:
    prompt: str
    live: list[Candidate]
    finished: list[Candidate] = field(default_factory=list)
    subtree: dict[int, int] = field(default_factory=dict)  # candidate id -> DVTS subtree
    trace: list[dict] = field(default_factory=list)
    generated: int = 0
    scored: int = 0
    done: bool = False


class Searcher:
    """Runs ``SearchConfig`` over prompts with an ``IncrementalScorer`` and a step generator (see ``search()``)."""

    def __init__(self, scorer: IncrementalScorer, generator, config: SearchConfig) -> None:
        self.inc, self.gen, self.cfg = scorer, generator, config
        # the generator samples with the policy's own cache: the scorer takes log pi from its hidden states
        self.shared_policy = getattr(generator, "name", None) == "policy"
        if self.shared_policy and getattr(generator, "model", None) is not scorer.scorer.policy:
            raise ValueError("a generator may use the cache name 'policy' only when its model is the PRM's policy")
        check_delimiter(scorer.tokenizer, config.step_delimiter)
        n_delim = len(scorer.tokenizer(config.step_delimiter, add_special_tokens=False)["input_ids"])
        if n_delim >= config.max_step_tokens:
            raise ValueError(f"step_delimiter {config.step_delimiter!r} takes {n_delim} tokens, so it never appears "
                             f"within max_step_tokens={config.max_step_tokens} after a step's content; raise "
                             "max_step_tokens or shorten the delimiter")

    def run(self, prompts: Sequence[str], *, seed: int | None = None,
            on_step: Callable[[int, int, int], None] | None = None) -> list[SearchResult]:
        """Search every prompt (batched); ``on_step(step, generated_tokens, scored_tokens)`` after each step."""
        cfg = self.cfg
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty; every prompt needs text")
        rng = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        self.inc.reset_ids()
        roots = self.inc.start(list(prompts))
        self.gen.start(roots)
        room = self.inc.scorer.max_length
        self._limit = [min(cfg.max_tokens, room - len(r.prompt_ids)) for r in roots]  # response tokens per prompt
        pools = []
        for p, root in zip(prompts, roots):
            kids = self.inc.fork(root, cfg.n)
            self.inc.drop(root)
            pool = _Pool(p, kids)
            if cfg.method == "dvts":
                pool.subtree = {c.id: j // cfg.beam_width for j, c in enumerate(kids)}
            pools.append(pool)
        any_delimiter = False
        for step in range(cfg.max_steps):
            live = [c for pool in pools if not pool.done for c in pool.live]
            if not live:
                break
            outs = self.gen.generate_step(live, delimiter=cfg.step_delimiter, max_step_tokens=cfg.max_step_tokens,
                                          max_tokens=[self._limit[c.prompt_index] for c in live],
                                          generator=rng)
            any_delimiter |= any(o.end == "delimiter" for o in outs)
            with_step = [(c, o) for c, o in zip(live, outs) if o.ids]
            if with_step:
                rows = [o.rows for _, o in with_step] if self.shared_policy else None
                self.inc.extend([c for c, _ in with_step], [o.ids for _, o in with_step], policy_rows=rows)
            by_pool: dict[int, list[tuple[Candidate, StepOutput]]] = {}
            for c, o in zip(live, outs):
                by_pool.setdefault(c.prompt_index, []).append((c, o))
                if o.ids:
                    c.cut.append(o.end == "step_limit")
                c.carry = o.carry
                if self.shared_policy:
                    c.carry_rows = list(o.carry_rows)
                if o.end in ("eos", "length"):
                    c.status = o.end
                elif cfg.stop and o.ids and any(x in self.inc.tokenizer.decode(o.ids) for x in cfg.stop):
                    c.status = "stop"
            for pi, pool in enumerate(pools):
                if pool.done:
                    continue
                pairs = by_pool.get(pi, [])
                pool.generated += sum(o.sampled for _, o in pairs)
                pool.scored += sum(len(o.ids) for _, o in pairs)
                self._select(pool, step, pairs)
            if on_step is not None:
                on_step(step, sum(o.sampled for o in outs), sum(len(o.ids) for o in outs))
        if not any_delimiter and cfg.max_steps > 1:
            warnings.warn(f"no candidate produced the step delimiter {cfg.step_delimiter!r}: every step ended at "
                          f"max_step_tokens={cfg.max_step_tokens}, EOS or the length limit; check the delimiter "
                          "and the prompt's step format", stacklevel=2)
        return [self._result(pool) for pool in pools]

    # ------------------------------------------------------------------ per-method selection
    def _select(self, pool: _Pool, step: int, pairs: list[tuple[Candidate, StepOutput]]) -> None:
        cfg, inc = self.cfg, self.inc
        agg = cfg.aggregate
        newly = [c for c, _ in pairs if c.status != "live"]
        for c in newly:
            c.states = {}  # finished: caches no longer needed
        pool.finished += newly
        live = [c for c in pool.live if c.status == "live"]
        entry = {"step": step, "live": len(live), "finished": len(pool.finished),
                 "scores": [c.score(agg) for c, _ in pairs], "ends": [o.end for _, o in pairs],
                 "candidates": [c.id for c, _ in pairs]}
        if cfg.method == "best_of_n":
            pool.live = live
        elif cfg.method == "beam":
            if len(pool.finished) >= cfg.n:
                for c in live:
                    inc.drop(c)
                live = []
            keep = _rank(live, agg)[:cfg.n // cfg.beam_width]
            for c in live:
                if c not in keep:
                    inc.drop(c)
            entry["kept"] = [c.id for c in keep]
            pool.live = self._expand(keep, pool) if step + 1 < cfg.max_steps else keep
        else:  # dvts
            groups: dict[int, list[Candidate]] = {}
            for c in live:
                groups.setdefault(pool.subtree[c.id], []).append(c)
            keep = []
            for g in sorted(groups):
                best = _rank(groups[g], agg)[0]
                keep.append(best)
                for c in groups[g]:
                    if c is not best:
                        inc.drop(c)
            entry["kept"] = [c.id for c in keep]
            pool.live = self._expand(keep, pool) if step + 1 < cfg.max_steps else keep
        pool.trace.append(entry)
        if not pool.live:
            pool.done = True

    def _expand(self, keep: list[Candidate], pool: _Pool) -> list[Candidate]:
        out = []
        for c in keep:
            kids = [c] + self.inc.fork(c, self.cfg.beam_width - 1) if self.cfg.beam_width > 1 else [c]
            for k in kids:
                pool.subtree[k.id] = pool.subtree.get(c.id, 0)
            out += kids
        return out

    def _result(self, pool: _Pool) -> SearchResult:
        agg, tok = self.cfg.aggregate, self.inc.tokenizer
        for c in pool.live:
            c.status = "budget"
            c.states = {}
        finals = pool.finished + pool.live
        cands = []
        for c in finals:
            sr = c.step_rewards
            cands.append({"text": tok.decode(c.response_ids), "steps": step_texts(tok, c.response_ids, c.step_ends),
                          "step_rewards": list(sr), "score": c.score(agg) if sr else None, "status": c.status,
                          "num_tokens": len(c.response_ids), "cut": list(c.cut), "id": c.id,
                          "token_ids": list(c.response_ids), "step_ends": list(c.step_ends)})
        best = pick_best([c["score"] for c in cands])
        return SearchResult(pool.prompt, cands, best, pool.trace, pool.generated, pool.scored, len(pool.trace), agg)


# ---------------------------------------------------------------------- public entry
def split_scoring_options(options: dict) -> tuple[dict, dict]:
    """``(ScoringConfig fields, the other Scorer options)`` of keyword options (``SCORING_OPTIONS`` go to the config)."""
    return ({k: v for k, v in options.items() if k in SCORING_OPTIONS},
            {k: v for k, v in options.items() if k not in SCORING_OPTIONS})


def build_searcher(policy=None, reference=None, *, config: SearchConfig, scorer=None, generator=None,
                   backend: str = "transformers", **scorer_kwargs) -> Searcher:
    """A ``Searcher`` from model specs: the PRM (``policy`` with ``config.scoring``, ``reference`` overriding its
    reference; or a ready ``scorer``) and the generator (None: the PRM's policy model; a spec or ``(model,
    tokenizer)``; or a ready step generator object). ``scorer_kwargs``: engine options that are not scoring
    semantics (``device``, ``max_batch_tokens``, ``impl``, ``trust_remote_code``, ...)."""
    from ..engine.loading import DEFAULT_POLICY, load_model
    from ..engine.scorer import Scorer, _check_same_vocab
    from .generation import TransformersStepGenerator, VLLMStepGenerator

    if scorer is None:
        # fields given neither in config.scoring (ScoringConfig.given) nor here are the Scorer's to resolve: a
        # trained PRM's freeprm_prm.json, else the defaults
        opts = {k: v for k, v in scorer_kwargs.items() if v is not None or k not in SCORING_OPTIONS}
        scorer = Scorer(policy if policy is not None else DEFAULT_POLICY, reference, config=config.scoring,
                        step_delimiter=config.step_delimiter, aggregate=config.aggregate, **opts)
    elif scorer_kwargs or reference is not None:
        raise ValueError(f"with scorer=, pass no model or scorer options "
                         f"({', '.join(sorted(scorer_kwargs) + (['reference'] if reference is not None else []))})")
    inc = IncrementalScorer(scorer)
    if backend not in ("transformers", "vllm"):
        raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}")
    if generator is None or isinstance(generator, (str, tuple)) or isinstance(generator, torch.nn.Module):
        if backend == "vllm":
            spec = policy if generator is None else generator
            if not isinstance(spec, str):
                raise ValueError("backend='vllm' needs the generator as a model path or hub id")
            gen = VLLMStepGenerator(spec, scorer.tokenizer, temperature=config.temperature, top_p=config.top_p,
                                    seed=config.seed)
        else:
            if generator is None:  # the policy writes the steps, through the policy's own KV cache
                gen = TransformersStepGenerator(scorer.policy, scorer.tokenizer, temperature=config.temperature,
                                                top_p=config.top_p, name="policy")
            else:
                model, tok = load_model(generator, dtype=scorer.dtype, device=scorer.device)
                _check_same_vocab(scorer.tokenizer, tok, scorer.policy, model)
                gen = TransformersStepGenerator(model, tok, temperature=config.temperature, top_p=config.top_p)
    else:
        gen = generator  # a ready step generator (start / generate_step)
    return Searcher(inc, gen, config)


def search(prompts: Sequence[str], policy=None, reference=None, *, config: ScoringConfig | None = None,
           method: str = "beam", n: int = 8, beam_width: int = 4, max_steps: int = 10,
           step_delimiter: str = UNSET, aggregate: str = UNSET, max_step_tokens: int = 128, max_tokens: int = 1024,
           temperature: float = 0.7, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), scorer=None,
           generator=None, backend: str = "transformers", **scorer_kwargs) -> list[SearchResult]:
    """PRM-guided step-level search over ``prompts``; one ``SearchResult`` per prompt (see the module docstring).

    ``policy`` / ``reference`` / ``config`` / ``scorer_kwargs`` build the PRM (``freeprm.engine.Scorer``:
    ``beta``, ``prompt_format``, ``dtype``, ``max_length``, ``device``, ``max_batch_tokens``, ...): ``config`` is
    a ``freeprm.ScoringConfig`` (as ``Scorer(config=)``; its step delimiter and aggregate are this search's unless
    given here; a ``step_pattern`` is refused: steps end at the delimiter while they are generated); keyword
    arguments win over it; what neither gives comes from a trained PRM directory's ``freeprm_prm.json``, else the
    defaults (``step_delimiter`` ``"\\n\\n"``, ``aggregate`` ``"min"``). Or pass a ready ``scorer=``.
    ``generator``: who writes the steps (default: the PRM's policy model; it must share the PRM's tokenizer).
    Example::

        res = search(["What is 12 * 7?"], policy="smollm2", method="beam", n=8, beam_width=4, max_steps=6)
        print(res[0].best_text, res[0].candidates[res[0].best]["step_rewards"])
    """
    scoring, other = split_scoring_options(scorer_kwargs)
    if scorer is not None and (scoring or config is not None):
        given = sorted(scoring) + (["config"] if config is not None else [])
        raise ValueError(f"with scorer=, pass no scoring options ({', '.join(given)}): the scorer has its own")
    if config is not None:
        config = merge_config(config, **scoring)  # keywords win over the config
        scorer_kwargs = other
        if step_delimiter is UNSET and config.is_given("step_delimiter"):
            step_delimiter = config.step_delimiter or ""
        if aggregate is UNSET and config.is_given("aggregate"):
            aggregate = config.aggregate
    step_delimiter = DEFAULT_STEP_DELIMITER if step_delimiter is UNSET else step_delimiter
    aggregate = DEFAULT_AGGREGATE if aggregate is UNSET else aggregate
    search_config = SearchConfig(method=method, n=n, beam_width=beam_width, max_steps=max_steps,
                                 step_delimiter=step_delimiter, aggregate=aggregate, max_step_tokens=max_step_tokens,
                                 max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 stop=tuple(stop), scoring=config)
    if isinstance(prompts, str) or not len(prompts) or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings (an empty prompt has nothing to "
                         "answer)")
    searcher = build_searcher(policy, reference, config=search_config, scorer=scorer, generator=generator,
                              backend=backend, **scorer_kwargs)
    return searcher.run(prompts)
