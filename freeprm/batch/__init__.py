"""Offline reranking at scale: streaming, resumable, optionally on Ray Data (``docs/batch.md``).

``rerank(input, output_dir, ...)`` scores groups of candidates into numbered Parquet/JSONL parts;
``RerankUDF`` is the callable class for ``ray.data.Dataset.map_batches``.
"""

from .job import RerankSummary
from .rerank import rerank
from .store import OutputDir, read_output


def __getattr__(name):  # RerankUDF imports ray lazily
    if name == "RerankUDF":
        from .ray_engine import RerankUDF

        return RerankUDF
    raise AttributeError(name)


__all__ = ["rerank", "RerankSummary", "RerankUDF", "read_output", "OutputDir"]
