"""Scale-out of ``rerank`` on Ray Data: ``RerankUDF`` on an actor pool, parts written by the driver.

Pipeline (``rerank(..., engine="ray", workers=K)`` / ``freeprm rerank --engine ray --workers K``)::

    read task (one per input file)   the same streaming reader as the local engine; it emits one row
                                     per chunk of rows_per_part groups (the groups as JSON), per bad
                                     line, and per chunk whose part is already written (resume: an
                                     anti-join on the parts in the output directory)
      -> map_batches(RerankUDF, batch_size=1, compute=ActorPoolStrategy(size=K), num_cpus=c, num_gpus=g)
                                     each actor loads the models once and scores whole chunks
      -> driver                      writes each chunk's part with the same atomic writer and manifest
                                     as the local engine, in input order (preserve_order)

Blocks hold one row each while the job runs (``DataContext.target_max_block_size`` is lowered,
then restored) so that chunks spread over the actors rather than being coalesced into one block.
Every chunk is scored in one ``score_groups`` call, as locally, so the output equals the local
engine's (bitwise with the same device and thread count; ``torch_threads`` sets the latter).
Ray Data 2.60 also has ``CheckpointConfig(id_column=...)`` (beta); it is not used because it
resumes rows of Ray's own writers, while these parts, manifest and fingerprint are shared with
the local engine (a job may be started locally and resumed on a cluster, or the reverse).
"""

from __future__ import annotations

import json

from .job import Progress, _report, _resume_part, _warn_extra_parts, _write_scored_part, score_groups
from .reader import BadLine, Group, iter_chunks, parse_row
from .store import output_schema, to_arrow_rows


def _transport_schema():
    import pyarrow as pa

    return pa.schema([("kind", pa.string()), ("part", pa.int64()), ("ids_sha", pa.string()), ("content", pa.string()),
                      ("line", pa.int64()), ("msg", pa.string()), ("payload", pa.large_string())])


def _row(**kw):
    """One transport row as a one-row table: a whole chunk ("chunk" / "part"), a bad line, or a resumed chunk."""
    import pyarrow as pa

    return pa.Table.from_pylist([{k: kw.get(k) for k in _transport_schema().names}], schema=_transport_schema())


def _read_chunks(path: str, fmt: str, rows_per_part: int, done: set[int]):
    """Read-task body: one row per chunk (its groups as JSON), per bad line, per already-written chunk."""
    for item in iter_chunks(path, rows_per_part, fmt):
        if isinstance(item, BadLine):
            yield _row(kind="bad", line=item.line, msg=item.message)
        elif item.index in done:  # anti-join: this chunk's part is already in the output directory
            yield _row(kind="resumed", part=item.index, ids_sha=item.ids_digest, content=item.content_digest,
                       payload=json.dumps(item.where()))
        else:
            yield _row(kind="chunk", part=item.index, ids_sha=item.ids_digest, content=item.content_digest,
                       payload=json.dumps([[g.id, g.prompt, g.candidates, g.line, g.lines, g.extra, g.cand_extra]
                                           for g in item.groups]))


def _datasource(path: str, fmt: str, rows_per_part: int, done: set[int]):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class _ChunkSource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[path], exec_stats=None)
            return [ReadTask(lambda: _read_chunks(path, fmt, rows_per_part, done), meta)]

    return _ChunkSource()


class RerankUDF:
    """Callable class for ``ray.data.Dataset.map_batches`` (``batch_format="pyarrow"``) that reranks groups.

    Builds one ``Scorer(policy, reference, **scorer_opts)`` per actor. A batch with columns ``id``,
    ``prompt``, ``candidates`` (rows as in ``reader.py``; each row is one group) is scored as one call
    and returned, one row per input row, with the output columns of ``rerank`` (see ``rerank.py``;
    ``extra`` and ``candidate_extra`` as JSON text, as in Parquet parts) plus ``error``: null, or why
    the row could not be read (its other columns are then null). Rejected candidates are in ``errors``,
    as in ``rerank``. Example::

        ds = ray.data.read_parquet("groups.parquet")
        out = ds.map_batches(RerankUDF, fn_constructor_kwargs={"policy": "/models/prm"},
                             batch_format="pyarrow", batch_size=256,
                             compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1)

    ``rerank(engine="ray")`` feeds it its own transport rows (whole chunks) instead.
    """

    def __init__(self, policy, reference=None, *, aggregate: str = "min", torch_threads: int | None = None,
                 pattern_timeout: float | None = 2.0, **scorer_opts) -> None:
        import torch

        from ..engine.scorer import Scorer

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.aggregate, self.pattern_timeout = aggregate, pattern_timeout
        self.scorer = Scorer(policy, reference, aggregate=aggregate, **scorer_opts)

    def __call__(self, batch):
        import pyarrow as pa

        if not isinstance(batch, pa.Table):
            batch = pa.Table.from_pandas(batch) if hasattr(batch, "to_dict") else pa.table(batch)
        if "payload" in batch.column_names:
            return self._transport(batch.to_pylist())
        return self._user(batch.to_pylist())

    def _transport(self, rows: list[dict]):
        out = []
        for r in rows:
            if r["kind"] != "chunk":
                out.append(r)
                continue
            groups = [Group(*g) for g in json.loads(r["payload"])]
            scored, invalid, n_cand, n_tok = score_groups(self.scorer, groups, self.aggregate, self.pattern_timeout)
            payload = json.dumps({"rows": scored, "invalid": invalid, "candidates": n_cand, "tokens": n_tok})
            out.append(dict(r, kind="part", payload=payload))
        import pyarrow as pa

        return pa.Table.from_pylist(out, schema=_transport_schema())

    def _user(self, rows: list[dict]):
        import pyarrow as pa

        groups, errors = [], {}
        for i, obj in enumerate(rows):
            try:
                _, gid, prompt, cands, extra, cand_extra = parse_row(obj)
            except (ValueError, RecursionError) as e:
                errors[i] = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
                continue
            groups.append(Group(gid, prompt, cands, i + 1, [], extra, cand_extra))
        scored, _, _, _ = score_groups(self.scorer, groups, self.aggregate, self.pattern_timeout)
        by_line = {r["line"]: r for r in scored}
        schema = output_schema().append(pa.field("error", pa.string()))
        out = []
        for i, obj in enumerate(rows):
            r = dict(by_line[i + 1]) if i + 1 in by_line else {"id": None if obj.get("id") is None else str(obj["id"])}
            r["line"] = i + 1
            r["error"] = errors.get(i)
            out.append(r)
        return pa.Table.from_pylist(to_arrow_rows(out), schema=schema)


def run_ray(input, in_fmt, out, summary, *, policy, reference, scorer_opts, aggregate, rows_per_part, strict, progress,
            quiet, workers, num_cpus, num_gpus, t0, torch_threads: int | None = None, address: str | None = None,
            pattern_timeout: float | None = 2.0) -> None:
    """The driver side of ``rerank(engine="ray")`` (see the module docstring)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'freeprm[batch]'") from None
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not (isinstance(policy, str) or hasattr(policy, "__fspath__")) or (
            reference is not None and not (isinstance(reference, str) or hasattr(reference, "__fspath__"))):
        raise ValueError("engine='ray' loads the models in each worker: pass policy/reference as paths or names")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size)
    ctx.execution_options.preserve_order = True  # parts come back in input order
    ctx.enable_progress_bars = False  # the driver shows its own bar
    # one transport row (a whole chunk) per block, so that chunks spread over the actor pool instead of
    # being coalesced into one block (and one actor task)
    ctx.target_max_block_size = 1
    done = set(out.done)
    remote = {"num_cpus": num_cpus}
    if num_gpus:
        remote["num_gpus"] = num_gpus
    opts = {k: v for k, v in scorer_opts.items() if k != "aggregate"}
    ds = ray.data.read_datasource(_datasource(input, in_fmt, rows_per_part, done), override_num_blocks=1)
    ds = ds.map_batches(RerankUDF, batch_format="pyarrow", batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        fn_constructor_args=(str(policy), None if reference is None else str(reference)),
                        fn_constructor_kwargs=dict(aggregate=aggregate, torch_threads=torch_threads,
                                                   pattern_timeout=pattern_timeout, **opts), **remote)
    bar = Progress(progress, t0)
    last = -1
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for r in batch.to_pylist():
                kind = r["kind"]
                if kind == "bad":
                    summary.bad_lines += 1
                    _report(summary, input, r["line"], r["msg"], strict, quiet)
                    continue
                part = r["part"]
                last = max(last, part)
                if kind == "resumed":
                    _resume_part(part, r["ids_sha"], r["content"], json.loads(r["payload"]), out, summary)
                    continue
                res = json.loads(r["payload"])
                _write_scored_part(part, r["ids_sha"], r["content"], res["rows"], res["invalid"], res["candidates"],
                                   res["tokens"], out, summary, input, strict, quiet, bar)
    finally:
        bar.close()
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size = saved
    _warn_extra_parts(out, last, quiet)
