"""Best-of-N evaluation of implicit PRMs: candidates, grading, selection, voting, reports.

Stages (also the ``freeprm bon`` command): ``generate_candidates`` -> ``score_candidates``
-> ``build_problems`` / ``build_table`` / ``write_report``. See docs/eval.md.
"""

from .candidates import generate_candidates, read_jsonl, validate_record
from .grading import answer_key, extract_answer, grade, is_equiv, last_boxed
from .report import build_problems, build_table, plot_table, table_markdown, write_report
from .scoring import score_candidates
from .selection import CandidateSet, accuracy_at_n, default_methods, select, vote, weights_from_scores
from .tasks import Problem, load_gsm8k, load_math500, load_task, make_arith

__all__ = [
    "generate_candidates", "read_jsonl", "validate_record",
    "answer_key", "extract_answer", "grade", "is_equiv", "last_boxed",
    "build_problems", "build_table", "plot_table", "table_markdown", "write_report",
    "score_candidates",
    "CandidateSet", "accuracy_at_n", "default_methods", "select", "vote", "weights_from_scores",
    "Problem", "load_gsm8k", "load_math500", "load_task", "make_arith",
]
