"""The select stage: read instruction data with Ray Data, normalise, score, pick k rows.

Reading and scoring run as Ray Data tasks over file shards, the scorers (``scorers.SCORERS``) fused into the
read tasks or in actor pools; the driver streams the scored batches once, writing the ranked pool to
``scored.parquet`` and set-aside rows to a file; the selector (``selectors.SELECTORS``) picks k rows from the
pool. Ranking: score descending, ties by id, then source and row.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import formats
from ..endpoints import read_cache
from . import report as select_report
from .rows import MESSAGES_TYPE, SelectError, assistant_lengths, in_read_tasks, scatter, token_counts, valid
from .scorers import SCORERS, Resolved, add_scorers, ranking, rating
from .selectors import SELECTORS

if TYPE_CHECKING:
    from ..config import ExperimentConfig, SelectConfig

log = logging.getLogger("alignment")

ROWS_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("messages", MESSAGES_TYPE),
    ("chars", pa.int64()), ("field", pa.string()), ("error", pa.string()),
])


def rows_table(rows: list[dict]) -> pa.Table:
    """Normalised rows as a ``ROWS_SCHEMA`` table, built column by column: the same table as
    ``pa.Table.from_pylist(rows, schema=ROWS_SCHEMA)`` in half the time (the nested messages column is the
    costly part; benchmark (a))."""
    offsets, roles, contents, null = [0], [], [], []
    for r in rows:
        messages = r.get("messages")
        null.append(messages is None)
        for m in messages or ():
            roles.append(m["role"])
            contents.append(m["content"])
        offsets.append(len(roles))
    turns = pa.StructArray.from_arrays([pa.array(roles, pa.string()), pa.array(contents, pa.string())],
                                       fields=list(MESSAGES_TYPE.value_type))
    messages = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), turns, type=MESSAGES_TYPE,
                                        mask=pa.array(null, pa.bool_()))
    return pa.Table.from_arrays(
        [messages if f.name == "messages" else pa.array([r.get(f.name) for r in rows], f.type) for f in ROWS_SCHEMA],
        schema=ROWS_SCHEMA)


READ_BLOCK = 8192  # rows per block out of a read task


def read_batch(batch: dict[str, Any], fmt: str, skip: dict[str, set[int]] | None = None) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of shard descriptions -> blocks of normalised rows (bad rows carry ``error``);
    rows listed in ``skip`` (source -> row indices: duplicates already set aside) are left out. Blocks of
    ``READ_BLOCK`` rows rather than a shard's whole: the scorers fused behind this start on the first block,
    and Ray Data, which sizes its budget by the first output, starts the other read tasks seconds sooner."""
    rows: list[dict] = []
    for i in range(len(batch["path"])):
        shard = formats.Shard.from_dict({k: column[i] for k, column in batch.items()})
        drop = (skip or {}).get(shard.path, ())
        for r in formats.read_shard(shard, "sft", fmt):
            if r["row"] in drop:
                continue
            rows.append(r)
            if len(rows) == READ_BLOCK:
                yield _rows_block(rows)
                rows = []
    if rows:
        yield _rows_block(rows)


def _rows_block(rows: list[dict]) -> pa.Table:
    table = rows_table(rows)
    # Response length in characters for the selection report, whatever the scorers (the length scorer's own
    # definition); null for invalid rows.
    chars = assistant_lengths(table["messages"], "chars")
    return table.set_column(table.schema.get_field_index("chars"), "chars",
                            pa.array(chars, pa.int64(), mask=~np.asarray(valid(table), bool)))


OVER_LONG = "over-long: "


def check_length_batch(table: pa.Table, max_tokens: int, tokenizer_path: str, chat_template: str | None) -> pa.Table:
    """Ray Data UDF: rows longer than ``max_tokens`` in the model's chat template (``model.chat_template`` where
    set) become invalid (with the reason)."""
    from .. import models

    ok = valid(table)
    tok = models.load_tokenizer(tokenizer_path, chat_template)
    msgs = [m for m, good in zip(table["messages"].to_pylist(), ok) if good]
    texts = [tok.apply_chat_template(m, tokenize=False) for m in msgs]
    # One task per CPU runs this (``in_read_tasks``): the tokenizer single-threaded.
    counts = scatter(token_counts(texts, tok, threads=False), ok)
    field, error = table["field"].to_pylist(), table["error"].to_pylist()
    for i, n in enumerate(counts):
        if n is not None and n > max_tokens:
            field[i] = "messages"
            error[i] = f"{OVER_LONG}{n} tokens in the chat template > select.max_tokens={max_tokens}"
    return (table.set_column(table.schema.get_field_index("field"), "field", pa.array(field, pa.string()))
            .set_column(table.schema.get_field_index("error"), "error", pa.array(error, pa.string())))


def mark_over_long_batch(table: pa.Table, over_long: dict[str, dict[int, str]]) -> pa.Table:
    """Ray Data UDF: the rows that an earlier pass over the same files found over-long (source -> row -> the
    reason ``check_length_batch`` gave) become invalid, without templating and tokenizing every row again."""
    field, error = table["field"].to_pylist(), table["error"].to_pylist()
    for i, (src, row) in enumerate(zip(table["source"].to_pylist(), table["row"].to_pylist())):
        why = over_long.get(src, {}).get(row)
        if why is not None and error[i] is None:
            field[i], error[i] = "messages", why
    return (table.set_column(table.schema.get_field_index("field"), "field", pa.array(field, pa.string()))
            .set_column(table.schema.get_field_index("error"), "error", pa.array(error, pa.string())))


def signature_batch(table: pa.Table, near: bool, num_perm: int, ngram: int, bands: int, rows: int,
                    seed: int) -> pa.Table:
    """Ray Data UDF: the dedup signatures of valid rows (``dedup_exact``; ``dedup_bands`` for near), and the
    rows the length check set aside (``over_long``: the reason; their signatures are zeros and unused), so
    that the scoring pass need not check lengths again."""
    from . import dedup

    hasher = dedup.MinHasher(num_perm, ngram, bands, rows, seed) if near else None
    ok = valid(table)
    errors = table["error"].to_pylist()
    over = [e is not None and e.startswith(OVER_LONG) for e in errors]
    take = [a or b for a, b in zip(ok, over)]
    sigs = [dedup.signatures(m, hasher) if good else (0, np.zeros(bands, np.uint64))
            for m, good, t in zip(table["messages"].to_pylist(), ok, take) if t]
    keep = table.filter(pa.array(take, pa.bool_())).select(["id", "source", "row"])
    out = (keep.append_column("over_long", pa.array([e for e, t in zip(errors, take) if t], pa.string()))
           .append_column("dedup_exact", pa.array([s[0] for s in sigs], pa.uint64())))
    if near:
        flat = np.concatenate([s[1] for s in sigs]) if sigs else np.zeros(0, np.uint64)
        out = out.append_column("dedup_bands", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint64()), bands))
    return out


def attach_messages(selected: pa.Table, shards: list[formats.Shard], fmt: str) -> pa.Table:
    """The selected rows' messages, read back from their files (only those rows are parsed), so that the
    scoring pass streams ids and scores alone to the driver."""
    want: dict[str, set[int]] = {}
    for src, row in zip(selected["source"].to_pylist(), selected["row"].to_pylist()):
        want.setdefault(src, set()).add(row)
    found: dict[tuple[str, int], Any] = {}
    for shard in shards:
        stop = math.inf if shard.stop is None else shard.stop
        rows = {r for r in want.get(shard.path, ()) if shard.start <= r < stop}
        if rows:
            for r in formats.read_shard(shard, "sft", fmt, only=rows):
                found[(r["source"], r["row"])] = r.get("messages")
    msgs = [found.get(key) for key in zip(selected["source"].to_pylist(), selected["row"].to_pylist())]
    missing = [i for i, m in zip(selected["id"].to_pylist(), msgs) if m is None]
    if missing:
        raise SelectError(f"selected rows changed in their files while selecting (first: {missing[:3]}); run again")
    return selected.append_column("messages", pa.array(msgs, MESSAGES_TYPE))


def _main_reasons(reasons: dict[str, int], n: int = 3) -> str:
    """The ``n`` most common set-aside reasons with their counts, for an error message."""
    top = sorted(reasons.items(), key=lambda x: -x[1])
    text = ", ".join(f"{key} ({count})" for key, count in top[:n])
    more = len(top) - n
    return text + (f" and {more} other reason{'s' * (more > 1)}" if more > 0 else "") if top else "none"


def _ranked(good: pa.Table, ranking: dict[str, float]) -> tuple[pa.Table, pa.Table]:
    """Split scored rows into ranked ones (with ``score`` = the weighted sum) and ones with a null ranking score."""
    cols = list(ranking)
    null = pc.is_null(good[cols[0]])
    for c in cols[1:]:
        null = pc.or_(null, pc.is_null(good[c]))
    unscored = good.filter(null)
    ranked = good.filter(pc.invert(null))
    total = None
    for c, w in ranking.items():
        term = pc.multiply(ranked[c], w)
        total = term if total is None else pc.add(total, term)
    return ranked.append_column("score", total.cast(pa.float64())), unscored


def read_tasks(shards: list[formats.Shard]) -> int:
    """Read tasks at a time: one per CPU of the cluster, at most one per shard."""
    import ray

    return max(1, min(len(shards), int(ray.cluster_resources().get("CPU", 1))))


def _rows(shards: list[formats.Shard], s: SelectConfig, resolved: Resolved, tasks: int,
          skip: dict[str, set[int]] | None = None, over_long: dict[str, dict[int, str]] | None = None) -> Any:
    """Ray Data: the normalised, validated rows of the shards, read by ``tasks`` tasks at a time
    (``read_tasks``; every op fused into the read tasks must be given the same count). ``skip``: rows to leave
    out; ``over_long``: the over-long rows when an earlier pass (``_dedup``) already checked every row's length."""
    import ray

    ds = ray.data.from_items([sh.to_dict() for sh in shards], override_num_blocks=len(shards)).map_batches(
        read_batch, fn_kwargs={"fmt": resolved.format, "skip": skip}, batch_size=1, batch_format="numpy",
        # Ray Data's own estimate runs one shard task at a time here (its output budget); a shard is
        # seconds of CPU work, so let every CPU of the cluster read one (no more tasks than shards: Ray
        # warns of a concurrency it cannot use).
        compute=ray.data.TaskPoolStrategy(size=tasks))
    if s.max_tokens and over_long is None:
        ds = in_read_tasks(ds, check_length_batch, tasks, max_tokens=s.max_tokens, tokenizer_path=resolved.tokenizer,
                           chat_template=resolved.chat_template)
    elif over_long:
        ds = in_read_tasks(ds, mark_over_long_batch, tasks, over_long=over_long)
    return ds


def _dedup(shards: list[formats.Shard], paths: list[str], s: SelectConfig, resolved: Resolved, tasks: int
           ) -> tuple[dict[str, set[int]], list[dict[str, Any]], dict[str, Any], dict[str, dict[int, str]] | None]:
    """A first pass over the data: which valid rows are duplicates (over-long rows are not valid: they take no
    part). Returns (source -> rows to skip, a set-aside record per removed row, counts, and the over-long rows
    as source -> row -> reason when ``max_tokens`` is set, else None)."""
    from . import dedup

    d = s.dedup
    near = d.mode == "near"
    bands, rows = dedup.lsh_params(d.threshold, d.num_perm) if near else (0, 0)
    t0 = time.perf_counter()
    ds = in_read_tasks(_rows(shards, s, resolved, tasks), signature_batch, tasks, near=near, num_perm=d.num_perm,
                       ngram=d.ngram, bands=bands, rows=rows, seed=resolved.seed)
    file_index = {p: i for i, p in enumerate(paths)}
    parts: list[pa.Table] = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=s.batch_size):
        parts.append(batch)
    table = pa.concat_tables(parts) if parts else None
    over_long: dict[str, dict[int, str]] | None = {} if s.max_tokens else None
    if table is not None:
        long_mask = pc.is_valid(table["over_long"])
        for src, row, why in zip(*(table.filter(long_mask)[c].to_pylist() for c in ("source", "row", "over_long"))):
            over_long.setdefault(src, {})[row] = why
        table = table.filter(pc.invert(long_mask))
    counts = {"mode": d.mode, "exact": 0, "near": 0, "seconds": 0.0}
    if near:
        counts.update({"threshold": d.threshold, "num_perm": d.num_perm, "ngram": d.ngram, "bands": bands,
                       "rows_per_band": rows})
    if table is None or table.num_rows == 0:
        return {}, [], counts, over_long
    order = (np.array([file_index[x] for x in table["source"].to_pylist()], np.int64) << 40) + table["row"].to_numpy()
    band_arr = (np.asarray(table["dedup_bands"].combine_chunks().flatten(), np.uint64).reshape(-1, bands)
                if near else None)
    dup, of, kind = dedup.find_duplicates(order, table["dedup_exact"].to_numpy(), band_arr)
    skip: dict[str, set[int]] = {}
    records = []
    ids, sources, row_idx = table["id"], table["source"], table["row"]
    for i, j, kd in zip(dup.tolist(), of.tolist(), kind.tolist()):
        skip.setdefault(sources[i].as_py(), set()).add(row_idx[i].as_py())
        what = "exact duplicate" if kd == 0 else f"near duplicate (MinHash LSH, Jaccard >= about {d.threshold})"
        records.append({"source": sources[i].as_py(), "row": row_idx[i].as_py(), "id": ids[i].as_py(),
                        "field": "(duplicate)", "error": f"{what} of {ids[j].as_py()} ({sources[j].as_py()}:"
                                                         f"{row_idx[j].as_py()})"})
    counts["exact"] = int((kind == 0).sum())
    counts["near"] = int((kind == 1).sum())
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return skip, records, counts, over_long


def needs(s: SelectConfig) -> dict[str, str]:
    """The models the configured scorers and ``max_tokens`` need resolved: ``Resolved`` field -> the config key
    naming the model (the selector's embedding model is ``select.embedding``'s, see ``SELECTORS``)."""
    out: dict[str, str] = {}
    for name in s.scorers:
        out.update(SCORERS[name].models(s))
    if s.max_tokens is not None:
        out["tokenizer"] = "model.base"  # rows are measured in its chat template
    return out


def model_names(cfg: ExperimentConfig) -> dict[str, tuple[str, str]]:
    """``Resolved`` field -> (config key, model name) of each model in :func:`needs`."""
    return {f: (key, attrgetter(key)(cfg)) for f, key in needs(cfg.select).items()}


def endpoint_sections(s: SelectConfig) -> list[str]:
    """The ``select`` sections of the endpoints the configured scorers send requests to."""
    return [section for name in s.scorers if (section := SCORERS[name].endpoint(s))]


def _check_resolved(s: SelectConfig, resolved: Resolved) -> None:
    missing = [f"{key} (Resolved.{f})" for f, key in needs(s).items() if getattr(resolved, f) is None]
    if SELECTORS[s.selector].embeds and resolved.embedding_model is None:
        missing.append("select.embedding.model (Resolved.embedding_model)")
    if missing:
        raise SelectError(f"the select stage needs these models resolved: {', '.join(missing)}")


@dataclass
class Pool:
    """What the scoring pass saw: rows read from the batches, ranked (valid and scored), invalid, unscored,
    removed as duplicates before it, and the set-aside reasons counted by kind (:func:`formats.reason_key`)."""

    read: int = 0
    valid: int = 0
    invalid: int = 0
    unscored: int = 0
    duplicate: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def set_aside(self) -> int:
        return self.invalid + self.unscored + self.duplicate

    def add_reason(self, key: str) -> None:
        self.reasons[key] = self.reasons.get(key, 0) + 1


def _split(batch: pa.Table, rank: dict[str, float]) -> tuple[pa.Table, list[dict], list[dict]]:
    """One scored batch -> (its ranked rows, with ``score``; set-aside records of its invalid rows; those of its
    rows with a null ranking score, naming the score and the scorer's reason)."""
    bad_mask = pc.is_valid(batch["error"])
    invalid = batch.filter(bad_mask).select(["source", "row", "id", "field", "error"]).to_pylist()
    ranked, unscored = _ranked(batch.filter(pc.invert(bad_mask)).drop_columns(["field", "error"]), rank)
    unscored_rows = [{"source": r["source"], "row": r["row"], "id": r["id"],
                      "field": next(c for c in rank if r[c] is None), "error": r.get("score_error") or "no score"}
                     for r in unscored.to_pylist()]
    return ranked, invalid, unscored_rows


def _score(ds: Any, s: SelectConfig, dup_records: list[dict], out_dir: Path,
           cache_path: Path | None) -> tuple[Pool, dict[str, Any] | None]:
    """The scoring pass, streamed once: the ranked rows to ``scored.parquet``, every set-aside row (the
    duplicates first) to ``set_aside.jsonl``, and with the rating endpoint (``cache_path``) its new answers to
    that file as they come (the driver owns it: tasks may run on other nodes), so that a re-run of a failed
    stage sends only the failed rows' requests. Returns the pool's counts and the rating requests' counts."""
    rank, pool, tally = ranking(s), Pool(duplicate=len(dup_records)), rating.new_tally()
    writer: pq.ParquetWriter | None = None
    with (open(out_dir / "set_aside.jsonl", "w") as aside,
          open(cache_path, "a") if cache_path else nullcontext() as cache):
        for r in dup_records:
            pool.add_reason("(duplicate): " + ("exact" if r["error"].startswith("exact") else "near"))
            aside.write(json.dumps(r) + "\n")
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=s.batch_size):
            pool.read += batch.num_rows
            if cache_path:
                batch = rating.keep_answers(batch, cache, tally)
            ranked, invalid, unscored = _split(batch, rank)
            pool.valid, pool.invalid, pool.unscored = (pool.valid + ranked.num_rows, pool.invalid + len(invalid),
                                                       pool.unscored + len(unscored))
            for r in invalid + unscored:
                pool.add_reason(formats.reason_key(r["field"], r["error"]))
                aside.write(json.dumps(r) + "\n")
            if ranked.num_rows:
                writer = writer or pq.ParquetWriter(out_dir / "scored.parquet", ranked.schema)
                writer.write_table(ranked)
            if tally["batch_failed"] and rating.failure(tally, s.rating, cache_path):
                # A whole batch failed and the failures so far are over the fraction: the endpoint looks down.
                # The stage fails now rather than after every row's retries; a re-run resumes.
                break
    if writer is not None:
        writer.close()
    if not cache_path:
        return pool, None
    failure = rating.failure(tally, s.rating, cache_path)
    if failure:
        raise SelectError(failure)
    return pool, {"rows": tally["rated"], "answered_earlier": tally["cached"], "failed": tally["failed"]}


def _check_pool(pool: Pool, s: SelectConfig, paths: list[str], aside_path: Path) -> None:
    """An empty pool is an error whatever ``allow_fewer`` says (an empty selection trains nothing); fewer valid
    rows than k is one unless ``allow_fewer``."""
    where = f"in {', '.join(paths)} ({pool.set_aside} set aside: {_main_reasons(pool.reasons)}; see {aside_path})"
    if pool.valid == 0:
        raise SelectError(f"no rows to select: 0 valid, scored rows {where}")
    if pool.valid < s.k and not s.allow_fewer:
        raise SelectError(f"select.k={s.k} is larger than the pool: {pool.valid} valid, scored rows {where}; lower "
                          "k or set select.allow_fewer=true")


def _pick(s: SelectConfig, resolved: Resolved, shards: list[formats.Shard], out_dir: Path) -> tuple[pa.Table, Any]:
    """The selector's k rows of the ranked pool, with their messages (read back from their files where the pool
    holds ids and scores only) and ``rank``, written to ``selected.parquet``; and the selector's result."""
    picked = SELECTORS[s.selector].pick(out_dir / "scored.parquet", s, resolved, out_dir)
    selected = picked.rows
    if selected.num_rows and "messages" not in selected.column_names:
        selected = attach_messages(selected, shards, resolved.format)
    selected = selected.append_column("rank", pa.array(range(1, selected.num_rows + 1), pa.int64()))
    pq.write_table(selected, out_dir / "selected.parquet")
    return selected, picked


def run_select(s: SelectConfig, resolved: Resolved, out_dir: Path) -> dict[str, Any]:
    """Select ``s.k`` rows of ``resolved.files`` as ``s`` says: read and dedup, score (:func:`_score`), check the
    pool, pick, export, report. Writes ``selected.parquet`` (with every score, the ranking ``score`` and ``rank``),
    ``scored.parquet`` (the whole ranked pool: ids and scores, with the messages only when the selector reads
    them again) and ``set_aside.jsonl`` (rows that failed validation or scoring, each with its field and reason)."""
    import ray

    _check_resolved(s, resolved)
    paths = formats.expand_paths(list(resolved.files))
    shards = formats.plan_shards(paths)
    tasks = read_tasks(shards)
    skip, dup_records, dedup_counts, over_long = (_dedup(shards, paths, s, resolved, tasks)
                                                  if s.dedup.mode != "none" else ({}, [], None, None))
    cache_path = out_dir / "rating_responses.jsonl" if rating.uses_endpoint(s) else None
    ds = add_scorers(_rows(shards, s, resolved, tasks, skip, over_long), s, resolved, tasks, list(ROWS_SCHEMA.names),
                     read_cache(cache_path) if cache_path else None)
    if not SELECTORS[s.selector].embeds:
        # Only ids and scores travel to the driver; the k selected rows' texts are read back at the end.
        ds = ds.drop_columns(["messages"], compute=ray.data.TaskPoolStrategy(size=tasks))  # fused into the reads too
    t0 = time.perf_counter()
    pool, requests = _score(ds, s, dup_records, out_dir, cache_path)
    scoring_s = time.perf_counter() - t0
    aside_path, scored_path = out_dir / "set_aside.jsonl", out_dir / "scored.parquet"
    _check_pool(pool, s, paths, aside_path)
    counts: dict[str, Any] = {"rows_read": pool.read + pool.duplicate, "rows_kept": pool.valid,
                              "rows_set_aside": pool.set_aside, "rows_invalid": pool.invalid,
                              "rows_unscored": pool.unscored, "rows_duplicate": pool.duplicate,
                              "set_aside_reasons": pool.reasons}
    if requests is not None:
        counts["rating_requests"] = requests
    if dedup_counts is not None:
        counts["dedup"] = dedup_counts
    counts["duplicate_ids"] = duplicate_ids(scored_path, paths)
    if counts["duplicate_ids"]["rows"]:
        log.warning("select: %d kept rows share their id with another row (duplicate ids, e.g. %s); ids key the "
                    "random scorer, k-means sampling and training splits", counts["duplicate_ids"]["rows"],
                    counts["duplicate_ids"]["examples"])
    if pool.set_aside:
        log.warning("select: %d of %d rows set aside (%s); see %s", pool.set_aside, counts["rows_read"],
                    pool.reasons, aside_path)
    selected, picked = _pick(s, resolved, shards, out_dir)
    if picked.counts is not None:
        counts[s.selector] = picked.counts
    counts["rows_selected"] = selected.num_rows
    outputs = {"selected": str(out_dir / "selected.parquet"), "scored": str(scored_path), "set_aside": str(aside_path),
               **picked.outputs}
    exported, left_out = export_selection(selected, s.export, out_dir)
    outputs.update(exported)
    if left_out:
        counts["export_set_aside"] = {fmt: len(rows) for fmt, rows in left_out.items()}
        for fmt, rows in left_out.items():
            log.warning("select: %d selected rows left out of the %s export (%s); see %s", len(rows), fmt,
                        rows[0]["error"], exported[f"export_{fmt}_set_aside"])
    scores = selected["score"] if selected.num_rows else pa.array([], pa.float64())
    metrics = {"files": paths, "scorers": list(s.scorers), "ranking": ranking(s), "length_unit": s.length_unit,
               "selector": s.selector, "read_and_score_s": round(scoring_s, 3),
               "select_s": round(time.perf_counter() - t0 - scoring_s, 3),
               "rows_per_s": round(counts["rows_read"] / scoring_s, 1) if scoring_s else None,
               "selected_score_min": pc.min(scores).as_py(), "selected_score_max": pc.max(scores).as_py()}
    outputs["report"] = str(select_report.write(out_dir, scored_path, selected, counts, metrics))
    return {"outputs": outputs, "counts": counts, "metrics": metrics}


def duplicate_ids(scored: Path, paths: list[str], examples: int = 5) -> dict[str, Any]:
    """Ranked rows whose id another ranked row has too: ``rows`` (beyond each id's first), ``ids`` and a few
    ``examples`` (id -> its rows as ``file:row``, in file order). Reported, not set aside: which copy to keep
    is the data's owner's call; fallback ids never repeat (:func:`formats.file_labels`)."""
    none: dict[str, Any] = {"rows": 0, "ids": 0, "examples": {}}
    if not scored.exists():
        return none
    t = pq.read_table(scored, columns=["id", "source", "row"])
    per_id = t.group_by("id").aggregate([("id", "count")])
    repeated = per_id.filter(pc.greater(per_id["id_count"], 1))
    if repeated.num_rows == 0:
        return none
    shown = sorted(repeated["id"].to_pylist())[:examples]
    order = {p: i for i, p in enumerate(paths)}
    where: dict[str, list[tuple[int, int, str]]] = {}
    for i, src, row in zip(*(t.filter(pc.is_in(t["id"], pa.array(shown)))[c].to_pylist() for c in t.column_names)):
        where.setdefault(i, []).append((order.get(src, len(order)), row, f"{src}:{row}"))
    return {"rows": int(pc.sum(repeated["id_count"]).as_py()) - repeated.num_rows, "ids": repeated.num_rows,
            "examples": {i: [x[2] for x in sorted(where[i])] for i in shown}}


def export_selection(selected: pa.Table, fmts: list[str],
                     out_dir: Path) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """``selected.<format>.jsonl`` for each export format (trl, sharegpt, alpaca), rows in rank order.

    A row that a format cannot hold (Alpaca: one exchange) is left out of that format's file only, and
    listed with its rank and the reason in ``selected.<format>.set_aside.jsonl``. Returns (outputs, format ->
    the rows left out of it)."""
    out: dict[str, str] = {}
    left_out: dict[str, list[dict[str, Any]]] = {}
    rows = selected.select(["id", "messages"]).to_pylist() if selected.num_rows else []
    for fmt in fmts:
        lines, left = [], []
        for rank, r in enumerate(rows, start=1):
            try:
                lines.append(json.dumps(formats.export_row(r, fmt), ensure_ascii=False))
            except formats.RowError as e:
                left.append({"id": r["id"], "rank": rank, "field": e.field, "error": e.reason})
        path = out_dir / f"selected.{fmt}.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        out[f"export_{fmt}"] = str(path)
        if left:
            aside = out_dir / f"selected.{fmt}.set_aside.jsonl"
            aside.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in left))
            out[f"export_{fmt}_set_aside"] = str(aside)
            left_out[fmt] = left
    return out, left_out
