"""An implicit PRM behind HF search-and-learn's ``PRM`` interface (``sal.models.reward_models``).

search-and-learn (not on PyPI) asks its PRM for ``score(questions, outputs) -> list[list[list[float]]]``: for
question ``i`` and its answer ``j``, one score in ``[0, 1]`` per ``"\\n\\n"``-separated step (``len(answer.split(
"\\n\\n"))`` scores), which it aggregates with ``last``, ``min`` or ``prod``. ``SearchAndLearnPRM`` scores each
(question, answer) with ``freeprm.engine.Scorer`` (all answers of a call in one batched call, prompts shared) and
maps the implicit rewards into ``[0, 1]``:

* ``calibration="q"`` (default): ``sigmoid(scale * Q_k)``, ``Q_k = r_1 + ... + r_k`` the running sum of step
  rewards. Why: an implicit PRM is trained as an outcome model with ``p(correct | y) = sigmoid(beta * log
  pi(y)/pi_ref(y))`` (cross-entropy loss, arXiv 2412.01981), and that log-ratio summed over a whole response is
  exactly its last Q value; so ``sigmoid(Q_last)`` is the probability of a correct answer the PRM was trained to
  predict, and ``last`` (search-and-learn's default) ranks by it. For a prefix, ``Q_k`` is the PRM's value of the
  partial solution (the paper's ``q_t``), and ``sigmoid`` keeps its order, so ``min`` ranks by the worst prefix value.
* ``calibration="step"``: ``sigmoid(scale * r_k)``, each step's own reward; ``min`` then ranks by the worst step
  (the aggregation the paper uses for best-of-N) and ``prod`` by ``sum_k log sigmoid(r_k)``, treating each step as
  an independent "this step is right" probability (as for Math-Shepherd-style PRMs).

``scale`` (default 1) multiplies the rewards first: use it when the rewards are not on the trained scale, e.g. an untrained
reference-free model, whose rewards are log-probs (tens of nats negative, where ``sigmoid`` is 0 to float
precision): ``scale=0.05`` keeps them apart. Blank pieces (``"a\\n\\n\\n\\nb"``, a trailing ``"\\n\\n"``) get the score
of the step whose characters they are (the one before them, ``engine/steps.py``); an answer with no text gets
``sigmoid(0) = 0.5`` per piece (no evidence either way).

This adapter scores whole texts (the interface gives whole texts at each call); freeprm's own search
(``freeprm.search``) scores incrementally. Add to search-and-learn's ``load_prm`` (``sal/models/reward_models.py``)::

    if config.prm_path.startswith("freeprm:"):
        from freeprm.integrations.search_and_learn import SearchAndLearnPRM
        return SearchAndLearnPRM(config, policy=config.prm_path.removeprefix("freeprm:"))

and set ``prm_path`` to ``freeprm:/path/to/trained_prm`` (or ``freeprm:smollm2``) in a recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SAL_DELIMITER = "\n\n"  # search-and-learn's step separator
CALIBRATIONS = ("q", "step")


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class SearchAndLearnPRM:
    """search-and-learn's ``PRM`` interface over a freeprm implicit PRM (see the module docstring).

    Args:
        search_config: search-and-learn's ``Config`` (kept as ``self.search_config``, as its ``PRM`` base does; its
            ``prm_batch_size`` bounds the answers per Scorer call when present), or None.
        policy / reference / scorer_kwargs: the PRM, as for ``freeprm.engine.Scorer`` (a trained PRM directory's
            ``freeprm_prm.json`` applies through it); or ``scorer=`` a ready ``Scorer``.
        calibration: ``"q"`` (sigmoid of Q values, default) or ``"step"`` (sigmoid of step rewards).
        scale: multiplies the rewards before the sigmoid.
        prompt_template: how a question becomes the scored prompt (``{question}`` is replaced).
    """

    def __init__(self, search_config=None, *, policy=None, reference=None, scorer=None, calibration: str = "q",
                 scale: float = 1.0, prompt_template: str = "{question}", **scorer_kwargs) -> None:
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if "{question}" not in prompt_template:
            raise ValueError("prompt_template must contain '{question}'")
        if scorer is None:
            from ..engine.scorer import Scorer

            kwargs = dict(scorer_kwargs, step_delimiter=SAL_DELIMITER)
            scorer = (Scorer(policy, reference, **kwargs) if policy is not None
                      else Scorer(reference=reference, **kwargs))
        elif policy is not None or reference is not None or scorer_kwargs:
            raise ValueError("pass either scorer= or model specs (policy=, reference=, ...), not both")
        if scorer.step_delimiter != SAL_DELIMITER or scorer.step_pattern is not None:
            raise ValueError("search-and-learn splits steps at '\\n\\n': the scorer must use step_delimiter='\\n\\n' "
                             "and no step_pattern")
        self.search_config, self.scorer = search_config, scorer
        self.model, self.tokenizer = scorer.policy, scorer.tokenizer  # what search-and-learn's PRMs expose
        self.calibration, self.scale, self.prompt_template = calibration, float(scale), prompt_template
        self.batch_size = max(1, int(getattr(search_config, "prm_batch_size", 0) or 0)) if search_config else None

    def _piece_scores(self, answer: str, result) -> list[float]:
        """One calibrated score per ``answer.split("\\n\\n")`` piece, from the result's steps (character spans)."""
        pieces = answer.split(SAL_DELIMITER)
        if result is None:
            return [0.5] * len(pieces)
        values = result.q_values if self.calibration == "q" else result.step_rewards
        probs = [_sigmoid(self.scale * float(v)) for v in values]
        starts = [a for a, _ in result.step_spans]
        out, pos = [], 0
        for piece in pieces:
            # the step owning this piece: the last step starting at or before its first character (step 0 before any)
            k = max((i for i, s in enumerate(starts) if s <= pos), default=0)
            out.append(probs[k])
            pos += len(piece) + len(SAL_DELIMITER)
        return out

    def score(self, questions: Sequence[str], outputs: Sequence[Sequence[str]]) -> list[list[list[float]]]:
        """``scores[i][j][k]``: the ``[0, 1]`` score of step (``"\\n\\n"`` piece) ``k`` of answer ``j`` to question
        ``i``."""
        if len(questions) != len(outputs):
            raise ValueError(f"{len(questions)} questions but {len(outputs)} lists of answers")
        items, where = [], []
        for i, (q, answers) in enumerate(zip(questions, outputs)):
            if not isinstance(q, str) or isinstance(answers, str):
                raise ValueError(f"question {i}: expected a string and a list of answer strings")
            for j, a in enumerate(answers):
                if not isinstance(a, str):
                    raise ValueError(f"question {i}, answer {j}: expected a string, got {type(a).__name__}")
                if a.strip():
                    where.append((i, j))
                    items.append({"prompt": self.prompt_template.format(question=q), "response": a})
        results = {}
        step = self.batch_size or max(1, len(items))
        for s in range(0, len(items), step):
            for (i, j), r in zip(where[s:s + step], self.scorer.score(items[s:s + step])):
                results[(i, j)] = r
        return [[self._piece_scores(a, results.get((i, j))) for j, a in enumerate(answers)]
                for i, answers in enumerate(outputs)]
