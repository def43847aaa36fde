"""Best-of-N evaluation of implicit PRMs: candidates, grading, selection, voting, reports.

Stages (also the ``freeprm bon`` command): ``generate_candidates`` -> ``score_candidates``
-> ``build_problems`` / ``build_table`` / ``write_report``. See docs/eval.md.
"""

from .candidates import generate_candidates
from .grading import grade
from .report import build_problems, build_table, table_markdown, write_report
from .scoring import score_candidates
from .selection import CandidateSet, accuracy_at_n, select, vote
from .tasks import Problem, load_task

__all__ = [
    "generate_candidates", "score_candidates", "build_problems", "build_table", "write_report", "table_markdown",
    "load_task", "grade", "select", "vote", "accuracy_at_n", "CandidateSet", "Problem",
]
