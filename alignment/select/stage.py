"""The select stage: read instruction data with Ray Data, normalise, score, keep the top k.

Reading and scoring run as Ray Data tasks over file shards; the driver streams the scored batches once,
keeping the k best rows (bounded memory: k rows plus one batch) and writing set-aside rows to a file.
Ranking: score descending, ties by id, then source and row.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import formats

from . import embed, scoring
from ..errors import AlignmentError
from ..ray_env import actor_pool, actor_threads

log = logging.getLogger("alignment")

MESSAGES_TYPE = scoring.MESSAGES_TYPE
ROWS_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("messages", MESSAGES_TYPE),
    ("chars", pa.int64()), ("field", pa.string()), ("error", pa.string()),
])


class SelectError(AlignmentError, ValueError):
    pass


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
    chars = scoring.assistant_lengths(table["messages"], "chars")
    return table.set_column(table.schema.get_field_index("chars"), "chars",
                            pa.array(chars, pa.int64(), mask=~np.asarray(_valid(table), bool)))


OVER_LONG = "over-long: "


def check_length_batch(table: pa.Table, max_tokens: int, tokenizer_path: str, chat_template: str | None) -> pa.Table:
    """Ray Data UDF: rows longer than ``max_tokens`` in the model's chat template (``model.chat_template`` where
    set) become invalid (with the reason)."""
    from .. import models

    ok = _valid(table)
    tok = models.load_tokenizer(tokenizer_path, chat_template)
    msgs = [m for m, good in zip(table["messages"].to_pylist(), ok) if good]
    texts = [tok.apply_chat_template(m, tokenize=False) for m in msgs]
    # One task per CPU runs this (``in_read_tasks``): the tokenizer single-threaded.
    counts = _scatter(scoring.token_counts(texts, tok, threads=False), ok)
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
    ok = _valid(table)
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


def _merge_errors(table: pa.Table, errors: list[str | None]) -> pa.Table:
    """Add this scorer's per-row failure reasons to ``score_error`` ("; "-joined)."""
    if "score_error" in table.column_names:
        old = table["score_error"].to_pylist()
        errors = ["; ".join(x for x in (o, e) if x) or None for o, e in zip(old, errors)]
        table = table.drop_columns(["score_error"])
    return table.append_column("score_error", pa.array(errors, pa.string()))


def _valid(table: pa.Table) -> list[bool]:
    return pc.is_null(table["error"]).to_pylist()


def _scatter(values: list, ok: list[bool], fill: Any = None) -> list:
    it = iter(values)
    return [next(it) if good else fill for good in ok]


def score_length_batch(table: pa.Table, unit: str, tokenizer_path: str | None) -> pa.Table:
    """Ray Data UDF: ``score_length`` (null for rows that failed validation), computed in Arrow."""
    from .. import models

    tok = models.load_tokenizer(tokenizer_path) if unit == "tokens" else None
    # One task per CPU runs this (``add_scorers``): the tokenizer's own threads would only contend with them.
    lengths = scoring.assistant_lengths(table["messages"], unit, tok, threads=False).astype(np.float64)
    return table.append_column("score_length", pa.array(lengths, mask=~np.asarray(_valid(table), bool)))


def score_random_batch(table: pa.Table, seed: int) -> pa.Table:
    """Ray Data UDF: ``score_random``, uniform in [0, 1), a function of (seed, id) only."""
    ok = _valid(table)
    ids = [i for i, good in zip(table["id"].to_pylist(), ok) if good]
    return table.append_column("score_random", pa.array(_scatter(scoring.random_scores(ids, seed), ok), pa.float64()))


SCORE_LIST = pa.list_(pa.float64())
SCORER_COLUMNS = {"length": ["score_length"], "random": ["score_random"],
                  "deita": ["deita_complexity", "deita_quality", "score_deita_evol", "score_error"],
                  "rating": ["score_rating", "score_error"]}


class DeitaScorer:
    """Ray Data actor: Deita's complexity and quality scorers (transformers), one forward pass per batch."""

    def __init__(self, complexity_model: str, quality_model: str, max_length: int, batch_size: int, threads: int,
                 use_gpu: bool, dtype: str = "auto", batch_tokens: int | None = None):
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu else "cpu"
        self.complexity = scoring.CausalLMScorer(complexity_model, max_length, batch_size, device, dtype,
                                                 batch_tokens=batch_tokens)
        self.quality = (self.complexity if quality_model == complexity_model else
                        scoring.CausalLMScorer(quality_model, max_length, batch_size, device, dtype,
                                               batch_tokens=batch_tokens))

    def __call__(self, table: pa.Table) -> pa.Table:
        ok = _valid(table)
        msgs = [m for m, good in zip(table["messages"].to_pylist(), ok) if good]
        res = _scatter(scoring.deita_scores(msgs, self.complexity, self.quality), ok, {})
        return _merge_errors(
            table.append_column("deita_complexity", pa.array([r.get("deita_complexity") for r in res], SCORE_LIST))
            .append_column("deita_quality", pa.array([r.get("deita_quality") for r in res], SCORE_LIST))
            .append_column("score_deita_evol", pa.array([r.get("score_deita_evol") for r in res], pa.float64())),
            [r.get("error") for r in res],
        )


class LocalRater:
    """Ray Data actor: a local chat model rates each row 1-5 (greedy; an unparsed answer is a null score)."""

    def __init__(self, model_path: str, template: str, max_new_tokens: int, threads: int, use_gpu: bool):
        import torch

        from .. import models

        torch.set_num_threads(threads)
        self.model, self.tok = models.load_for_generation(model_path, use_gpu)
        self.template, self.max_new_tokens = template, max_new_tokens

    def __call__(self, table: pa.Table) -> pa.Table:
        from .. import models

        ok = _valid(table)
        msgs = [m for m, good in zip(table["messages"].to_pylist(), ok) if good]
        convs = [[{"role": "user", "content": scoring.rating_prompt(m, self.template)}] for m in msgs]
        answers = models.greedy_generate(self.model, self.tok, convs, self.max_new_tokens)[0] if convs else []
        return _rated(table, ok, answers, [None] * len(answers))


# What the rating endpoint's task tells the driver per row, which the driver reads and drops
# (``_keep_rating_answers``): the request's key and a newly received answer (to store), and the request's
# outcome: cached, answered, or the kind of failure.
RATING_KEY, RATING_ANSWER, RATING_STATUS = "_rating_key", "_rating_answer", "_rating_status"
CACHED, ANSWERED = "cached", "answered"


def rate_openai_batch(table: pa.Table, model: str, template: str, max_new_tokens: int, endpoint: Any,
                      timeout_s: float, concurrency: int, retry: Any = None,
                      cache: dict[str, dict] | None = None) -> pa.Table:
    """Ray Data UDF: an OpenAI-compatible endpoint (an :class:`endpoints.Endpoint`) rates each row 1-5; a row
    whose request has an answer in ``cache`` (from an earlier run of the stage) is not sent again."""
    from ..endpoints import Retry, complete_openai

    ok = _valid(table)
    rows = [(i, m) for i, m, good in zip(table["id"].to_pylist(), table["messages"].to_pylist(), ok) if good]
    requests = [{"id": i, "messages": [{"role": "user", "content": scoring.rating_prompt(m, template)}]} for i, m in rows]
    out = complete_openai(requests, model, endpoint, max_new_tokens, timeout_s, concurrency, retry or Retry(), cache)
    new = [not o["cached"] and not o["error"] for o in out]
    status = [CACHED if o["cached"] else o["error_kind"] or ANSWERED for o in out]
    rated = _rated(table, ok, [o["answer"] for o in out], [o["error"] and f"endpoint {o['error']}" for o in out])
    return (rated.append_column(RATING_KEY, pa.array(_scatter([o["key"] if n else None for o, n in zip(out, new)], ok),
                                                     pa.string()))
            .append_column(RATING_ANSWER, pa.array(_scatter([o["answer"] if n else None for o, n in zip(out, new)], ok),
                                                   pa.string()))
            .append_column(RATING_STATUS, pa.array(_scatter(status, ok), pa.string())))


def _rated(table: pa.Table, ok: list[bool], answers: list[str], failures: list[str | None]) -> pa.Table:
    """``score_rating`` from the answers of the valid rows; a row whose request failed (``failures``: the
    reason, ``endpoint <kind>: ...``) or whose answer is unparsed gets a null score and the reason."""
    scores, reasons = [], []
    for a, failed in zip(answers, failures):
        score, why = (None, failed) if failed else scoring.parse_rating(a)
        scores.append(score)
        reasons.append(why)
    return _merge_errors(
        table.append_column("score_rating", pa.array(_scatter(scores, ok), pa.float64())),
        _scatter(reasons, ok),
    )


def add_scorers(ds: Any, spec: dict[str, Any], batch_size: int, tasks: int,
                rating_cache: dict[str, dict] | None = None) -> Any:
    """Chain the configured scorers onto a Ray Data dataset of normalised rows (``_rows``, read by ``tasks``
    tasks at a time: ``read_tasks``). ``rating_cache``: the rating endpoint's answers from an earlier run."""
    columns = list(ROWS_SCHEMA.names)
    for name in spec["scorers"]:
        if name == "length":
            ds = in_read_tasks(ds, score_length_batch, tasks, unit=spec["length_unit"],
                               tokenizer_path=spec.get("tokenizer"))
        elif name == "random":
            ds = in_read_tasks(ds, score_random_batch, tasks, seed=spec["seed"])
        elif name == "deita":
            d = spec["deita"]
            if d["backend"] == "vllm":
                from . import deita_vllm

                ds = deita_vllm.add_deita_vllm(ds, d, columns)
            else:
                ds = ds.map_batches(
                    DeitaScorer,
                    fn_constructor_kwargs={"complexity_model": d["complexity_model"], "quality_model": d["quality_model"],
                                           "max_length": d["max_length"], "batch_size": d["batch_size"],
                                           "threads": actor_threads(d), "use_gpu": d["gpus_per_actor"] > 0,
                                           "dtype": d["dtype"], "batch_tokens": d["batch_tokens"]},
                    batch_size=max(256, d["batch_size"]), batch_format="pyarrow", **actor_pool(d))
        elif name == "rating":
            r = spec["rating"]
            template = r.get("prompt") or scoring.RATING_PROMPT
            if r["backend"] == "openai":
                import ray

                from ..endpoints import Endpoint, Retry

                ds = ds.map_batches(
                    rate_openai_batch,
                    fn_kwargs={"model": r["model"], "template": template, "max_new_tokens": r["max_new_tokens"],
                               "endpoint": Endpoint(r["api_base_env"], r["api_key_env"]),
                               "timeout_s": r["timeout_s"], "concurrency": r["concurrency"],
                               "retry": Retry(r["max_retries"], r["retry_backoff_s"]), "cache": rating_cache},
                    batch_size=r["batch_size"] * r["concurrency"], batch_format="pyarrow",
                    # Requests in flight are bounded in all, not per task: tasks x concurrency.
                    compute=ray.data.TaskPoolStrategy(size=r["tasks"]))
            else:
                ds = ds.map_batches(
                    LocalRater,
                    fn_constructor_kwargs={"model_path": r["model"], "template": template,
                                           "max_new_tokens": r["max_new_tokens"], "threads": actor_threads(r),
                                           "use_gpu": r["gpus_per_actor"] > 0},
                    batch_size=r["batch_size"], batch_format="pyarrow", **actor_pool(r))
        else:
            raise SelectError(f"unknown scorer {name!r}")
        columns = [*dict.fromkeys([*columns, *SCORER_COLUMNS[name]])]
    return ds


class TopK:
    """The k best rows seen so far: score descending, ties by id, source, row."""

    SORT = [("score", "descending"), ("id", "ascending"), ("source", "ascending"), ("row", "ascending")]

    def __init__(self, k: int):
        self.k = k
        self.best: pa.Table | None = None

    def add(self, table: pa.Table) -> None:
        if self.best is not None and self.best.num_rows == self.k and table.num_rows:
            # Once k rows are held, only rows scoring at least the k-th can enter (ties go to the sort).
            table = table.filter(pc.greater_equal(table["score"], self.best["score"][self.k - 1]))
        if table.num_rows == 0:
            return
        merged = table if self.best is None else pa.concat_tables([self.best, table])
        self.best = merged.sort_by(self.SORT).slice(0, self.k)

    def result(self) -> pa.Table:
        return self.best if self.best is not None else pa.table({})


def _repr_filter(scored: Path, score_col: str, k: int, tau: float, emb: dict[str, Any],
                 batch_size: int) -> tuple[pa.Table, dict[str, int]]:
    """Deita's filter over the scored pool: sorted by score (ties by id), embedded lazily in that order by
    Ray Data actors, streamed through :class:`diversity.ReprFilter` until k rows are kept."""
    import ray

    from .diversity import ReprFilter

    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the filter's result depends on the order
    try:
        ds = embed.add_embeddings(
            ray.data.read_parquet(str(scored)).sort([score_col, "id", "source", "row"],
                                                    descending=[True, False, False, False]),
            emb, batch_size)
        f = ReprFilter(k, tau)
        kept: list[pa.Table] = []
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
            idx = f.add(embed.vectors(batch["embedding"], batch.num_rows))
            if idx:
                kept.append(batch.take(idx))
            if f.full:
                break
    finally:
        ctx.execution_options.preserve_order = preserve
    table = pa.concat_tables(kept) if kept else pa.table({})
    return table, {"scanned": f.scanned, "kept": f.n, "rejected_as_similar": f.scanned - f.n}


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


def _rank_in_group(labels: np.ndarray) -> np.ndarray:
    """Position of each row within its run of equal labels (rows already sorted by label)."""
    start = np.r_[0, np.flatnonzero(labels[1:] != labels[:-1]) + 1]
    return np.arange(len(labels)) - np.repeat(start, np.diff(np.r_[start, len(labels)]))


def _kmeans(scored: Path, k: int, n_clusters: int, fit_rows: int, emb: dict[str, Any], batch_size: int, seed: int,
            emb_path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """k-means diversity sampling: embed every ranked row (Ray Data actors; ``emb_path`` keeps ids, scores and
    embeddings), fit centroids on a seeded sample, assign every row, then take the best-scored row of every
    cluster in turn (cluster 0, 1, ..., then each one's second best, ...) until k rows are taken. Returns the
    chosen rows without their texts (every score, ``cluster``), best score first."""
    import ray
    from sklearn.cluster import KMeans

    writer: pq.ParquetWriter | None = None
    sample_h, sample_ids, sample_v = np.zeros(0), np.zeros(0, dtype=object), None
    ds = embed.add_embeddings(ray.data.read_parquet(str(scored)), emb, batch_size)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
        slim = batch.drop_columns(["messages"])
        if writer is None:
            writer = pq.ParquetWriter(emb_path, slim.schema)
        writer.write_table(slim)
        # The fitting sample: the rows with the smallest hash of (seed, id): the same whatever the order.
        ids = np.array(batch["id"].to_pylist(), dtype=object)
        v = embed.vectors(batch["embedding"], batch.num_rows)
        sample_h = np.concatenate([sample_h, scoring.random_scores(ids.tolist(), seed)])
        sample_ids = np.concatenate([sample_ids, ids])
        sample_v = v if sample_v is None else np.concatenate([sample_v, v])
        if len(sample_h) > 2 * fit_rows:
            keep = np.lexsort((sample_ids.astype(str), sample_h))[:fit_rows]
            sample_h, sample_ids, sample_v = sample_h[keep], sample_ids[keep], sample_v[keep]
    if writer is None:
        return pa.table({}), {"clusters": 0}
    writer.close()
    x = sample_v[np.lexsort((sample_ids.astype(str), sample_h))[:fit_rows]]
    n_clusters = min(n_clusters, len(x))
    km = KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto").fit(x)
    pool_sizes = np.zeros(n_clusters, dtype=np.int64)
    order = [("cluster", "ascending"), *TopK.SORT]
    cand: pa.Table | None = None
    for batch in pq.ParquetFile(emb_path).iter_batches(batch_size=max(batch_size, 8192)):
        t = pa.Table.from_batches([batch]).drop_columns(["embedding"])
        label = km.predict(embed.vectors(batch.column("embedding"), batch.num_rows)).astype(np.int64)
        pool_sizes += np.bincount(label, minlength=n_clusters)
        t = t.append_column("cluster", pa.array(label))
        t = (t if cand is None else pa.concat_tables([cand, t])).sort_by(order)
        cand = t.filter(pa.array(_rank_in_group(t["cluster"].to_numpy()) < k))  # no cluster gives more than k rows
    lab = cand["cluster"].to_numpy()
    take = np.lexsort((lab, _rank_in_group(lab)))[:k]  # round robin: every cluster's best, then second best, ...
    chosen = cand.take(pa.array(take)).sort_by(TopK.SORT)
    selected_sizes = np.bincount(chosen["cluster"].to_numpy(), minlength=n_clusters)
    return chosen, {"clusters": n_clusters, "fit_rows": int(len(x)), "inertia": float(km.inertia_),
                    "pool_per_cluster": pool_sizes.tolist(), "selected_per_cluster": selected_sizes.tolist()}


def spec(scorers: list[str] | None = None, ranking: dict[str, float] | None = None, length_unit: str = "tokens",
         tokenizer: str | None = None, seed: int = 0, selector: str = "top_k", tau: float = 0.9,
         deita: dict[str, Any] | None = None, rating: dict[str, Any] | None = None,
         embedding: dict[str, Any] | None = None, dedup: dict[str, Any] | None = None,
         max_tokens: int | None = None, clusters: int = 100, kmeans_fit_rows: int = 25_600,
         export: list[str] | None = None, chat_template: str | None = None) -> dict[str, Any]:
    """A selection spec (what :func:`run_select` takes) with the config's defaults."""
    from ..config import SCORE_COLUMNS, DedupConfig, DeitaConfig, RatingConfig, SelectConfig, config_dict

    scorers = scorers or ["length"]
    if max_tokens is not None and tokenizer is None:
        raise SelectError("max_tokens needs a tokenizer (the trained model's)")
    return {"scorers": scorers, "ranking": ranking or {SCORE_COLUMNS[scorers[0]]: 1.0}, "length_unit": length_unit,
            "tokenizer": tokenizer, "chat_template": chat_template, "seed": seed, "selector": selector, "tau": tau, "max_tokens": max_tokens,
            "clusters": clusters, "kmeans_fit_rows": kmeans_fit_rows, "export": list(SelectConfig().export if export is None else export),
            "dedup": {**config_dict(DedupConfig()), **(dedup or {})},
            "deita": {**config_dict(DeitaConfig()), **(deita or {})},
            "rating": {**config_dict(RatingConfig()), **(rating or {})},
            "embedding": _embedding_spec(embedding)}


def _embedding_spec(embedding: dict[str, Any] | None) -> dict[str, Any]:
    from ..config import EmbeddingConfig, config_dict

    e = {**config_dict(EmbeddingConfig()), **(embedding or {})}
    if e["model"] is None:
        if e["kind"] != "sentence":
            raise SelectError(f"embedding kind {e['kind']} needs a model (the pipeline passes model.base)")
        e["model"] = embed.DEFAULT_SENTENCE_MODEL
    return e


def _main_reasons(reasons: dict[str, int], n: int = 3) -> str:
    """The ``n`` most common set-aside reasons with their counts, for an error message."""
    top = sorted(reasons.items(), key=lambda x: -x[1])
    text = ", ".join(f"{key} ({count})" for key, count in top[:n])
    more = len(top) - n
    return text + (f" and {more} other reason{'s' * (more > 1)}" if more > 0 else "") if top else "none"


def _rating_failure(tally: dict[str, Any], rating: dict[str, Any], cache_path: Path) -> str | None:
    """Why the stage fails when more than ``max_failed_fraction`` of the rows' rating requests failed."""
    from ..endpoints import failure_message

    return failure_message("rating", tally["failed"], tally["rated"], tally["first_error"],
                           "select.rating.max_failed_fraction", rating["max_failed_fraction"],
                           tally["rated"] - sum(tally["failed"].values()), cache_path)


def _keep_rating_answers(batch: pa.Table, cache: Any, tally: dict[str, Any]) -> pa.Table:
    """The driver's part of the rating endpoint's work on one batch: store the newly received answers in the
    stage's cache file (so that a re-run sends only the failed rows' requests), count the requests by outcome
    in ``tally`` (``rated``, ``cached``, ``failed``: kind -> rows, ``first_error``, ``batch_failed``: whether
    every request of this batch failed), and return the batch without those columns."""
    from ..endpoints import cache_line

    keys, answers = batch[RATING_KEY].to_pylist(), batch[RATING_ANSWER].to_pylist()
    for key, answer in zip(keys, answers):
        if key is not None:
            cache.write(cache_line(key, answer))
    cache.flush()
    status = batch[RATING_STATUS].to_pylist()
    errors = batch["score_error"].to_pylist()
    sent = failed = 0
    for st, err in zip(status, errors):
        if st is None:  # an invalid row: never sent
            continue
        tally["rated"] += 1
        if st == CACHED:
            tally["cached"] += 1
            continue
        sent += 1
        if st != ANSWERED:
            failed += 1
            tally["failed"][st] = tally["failed"].get(st, 0) + 1
            if tally["first_error"] is None or tally["first_error"].startswith("endpoint not sent"):
                tally["first_error"] = err[err.find("endpoint "):]  # this scorer's reason, not another's
    tally["batch_failed"] = sent > 0 and failed == sent
    return batch.drop_columns([RATING_KEY, RATING_ANSWER, RATING_STATUS])


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


def _rows(shards: list[formats.Shard], fmt: str, s: dict[str, Any], tasks: int,
          skip: dict[str, set[int]] | None = None, over_long: dict[str, dict[int, str]] | None = None) -> Any:
    """Ray Data: the normalised, validated rows of the shards, read by ``tasks`` tasks at a time
    (``read_tasks``; every op fused into the read tasks must be given the same count). ``skip``: rows to leave
    out; ``over_long``: the over-long rows when an earlier pass (``_dedup``) already checked every row's length."""
    import ray

    ds = ray.data.from_items([sh.to_dict() for sh in shards], override_num_blocks=len(shards)).map_batches(
        read_batch, fn_kwargs={"fmt": fmt, "skip": skip}, batch_size=1, batch_format="numpy",
        # Ray Data's own estimate runs one shard task at a time here (its output budget); a shard is
        # seconds of CPU work, so let every CPU of the cluster read one (no more tasks than shards: Ray
        # warns of a concurrency it cannot use).
        compute=ray.data.TaskPoolStrategy(size=tasks))
    if s.get("max_tokens") and over_long is None:
        ds = in_read_tasks(ds, check_length_batch, tasks, max_tokens=s["max_tokens"],
                           tokenizer_path=s["tokenizer"], chat_template=s.get("chat_template"))
    elif over_long:
        ds = in_read_tasks(ds, mark_over_long_batch, tasks, over_long=over_long)
    return ds


def in_read_tasks(ds: Any, fn: Any, tasks: int, **kwargs: Any) -> Any:
    """``ds.map_batches(fn)`` on each block as the read tasks make it, so that Ray Data fuses ``fn`` into them:
    the rows' texts never cross the object store between reading and scoring, and each task reads and
    scores its shard on its own CPU. (A batch size here would make the fused task bundle that many shard
    descriptions: every shard in one task; benchmark (a).)"""
    import ray

    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=tasks))


def _dedup(shards: list[formats.Shard], paths: list[str], fmt: str, s: dict[str, Any], batch_size: int,
           tasks: int) -> tuple[dict[str, set[int]], list[dict[str, Any]], dict[str, Any], dict[str, dict[int, str]] | None]:
    """A first pass over the data: which valid rows are duplicates (over-long rows are not valid: they take no
    part). Returns (source -> rows to skip, a set-aside record per removed row, counts, and the over-long rows
    as source -> row -> reason when ``max_tokens`` is set, else None)."""
    import time

    from . import dedup

    d = s["dedup"]
    near = d["mode"] == "near"
    bands, rows = dedup.lsh_params(d["threshold"], d["num_perm"]) if near else (0, 0)
    t0 = time.perf_counter()
    ds = in_read_tasks(_rows(shards, fmt, s, tasks), signature_batch, tasks, near=near, num_perm=d["num_perm"],
                       ngram=d["ngram"], bands=bands, rows=rows, seed=s["seed"])
    file_index = {p: i for i, p in enumerate(paths)}
    parts: list[pa.Table] = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
        parts.append(batch)
    table = pa.concat_tables(parts) if parts else None
    over_long: dict[str, dict[int, str]] | None = {} if s.get("max_tokens") else None
    if table is not None:
        long_mask = pc.is_valid(table["over_long"])
        for src, row, why in zip(*(table.filter(long_mask)[c].to_pylist() for c in ("source", "row", "over_long"))):
            over_long.setdefault(src, {})[row] = why
        table = table.filter(pc.invert(long_mask))
    counts = {"mode": d["mode"], "exact": 0, "near": 0, "seconds": 0.0}
    if near:
        counts.update({"threshold": d["threshold"], "num_perm": d["num_perm"], "ngram": d["ngram"], "bands": bands,
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
        what = "exact duplicate" if kd == 0 else f"near duplicate (MinHash LSH, Jaccard >= about {d['threshold']})"
        records.append({"source": sources[i].as_py(), "row": row_idx[i].as_py(), "id": ids[i].as_py(),
                        "field": "(duplicate)", "error": f"{what} of {ids[j].as_py()} ({sources[j].as_py()}:"
                                                         f"{row_idx[j].as_py()})"})
    counts["exact"] = int((kind == 0).sum())
    counts["near"] = int((kind == 1).sum())
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return skip, records, counts, over_long


def run_select(sources: list[str], fmt: str, k: int, s: dict[str, Any], out_dir: Path, allow_fewer: bool = False,
               batch_size: int = 1024) -> dict[str, Any]:
    """Select k rows as the spec ``s`` says (see :func:`spec`). Writes ``selected.parquet`` (with every score,
    the ranking ``score`` and ``rank``), ``scored.parquet`` (the whole ranked pool: ids and scores, with
    the messages only when the selector reads them again) and ``set_aside.jsonl``
    (rows that failed validation or scoring, each with its field and reason)."""
    import time

    import ray

    paths = formats.expand_paths(sources)
    shards = formats.plan_shards(paths)
    tasks = read_tasks(shards)
    skip, dup_records, dedup_counts, over_long = (_dedup(shards, paths, fmt, s, batch_size, tasks)
                                                  if s["dedup"]["mode"] != "none" else ({}, [], None, None))
    # The rating endpoint's answers are stored as they come (the driver owns the file: tasks may run on other
    # nodes), so that a re-run of a failed stage, in this same directory, sends only the failed rows' requests.
    from ..endpoints import read_cache

    uses_endpoint = "rating" in s["scorers"] and s["rating"]["backend"] == "openai"
    cache_path = out_dir / "rating_responses.jsonl"
    rating_cache = read_cache(cache_path) if uses_endpoint else None
    tally: dict[str, Any] = {"rated": 0, "cached": 0, "failed": {}, "first_error": None, "batch_failed": False}
    ds = add_scorers(_rows(shards, fmt, s, tasks, skip, over_long), s, batch_size, tasks, rating_cache)
    if s["selector"] == "top_k":
        # Only ids and scores travel to the driver; the k selected rows' texts are read back at the end.
        ds = ds.drop_columns(["messages"], compute=ray.data.TaskPoolStrategy(size=tasks))  # fused into the reads too
    ranking, selector = s["ranking"], s["selector"]
    top = TopK(k)
    n_read = n_valid = n_invalid = n_unscored = 0
    reasons: dict[str, int] = {}
    aside_path, scored_path = out_dir / "set_aside.jsonl", out_dir / "scored.parquet"
    writer: pq.ParquetWriter | None = None
    t0 = time.perf_counter()
    with open(aside_path, "w") as aside, open(cache_path, "a") if uses_endpoint else nullcontext() as cache:
        for r in dup_records:
            key = "(duplicate): " + ("exact" if r["error"].startswith("exact") else "near")
            reasons[key] = reasons.get(key, 0) + 1
            aside.write(json.dumps(r) + "\n")
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
            n_read += batch.num_rows
            if uses_endpoint:
                batch = _keep_rating_answers(batch, cache, tally)
            bad_mask = pc.is_valid(batch["error"])
            bad = batch.filter(bad_mask)
            good = batch.filter(pc.invert(bad_mask)).drop_columns(["field", "error"])
            ranked, unscored = _ranked(good, ranking)
            n_invalid += bad.num_rows
            n_unscored += unscored.num_rows
            n_valid += ranked.num_rows
            aside_rows = bad.select(["source", "row", "id", "field", "error"]).to_pylist()
            for r in unscored.to_pylist():
                field = next(c for c in ranking if r[c] is None)
                aside_rows.append({"source": r["source"], "row": r["row"], "id": r["id"], "field": field,
                                   "error": r.get("score_error") or "no score"})
            for r in aside_rows:
                key = formats.reason_key(r["field"], r["error"])
                reasons[key] = reasons.get(key, 0) + 1
                aside.write(json.dumps(r) + "\n")
            if ranked.num_rows:
                if writer is None:
                    writer = pq.ParquetWriter(scored_path, ranked.schema)
                writer.write_table(ranked)
                if selector == "top_k":
                    top.add(ranked)
            if tally["batch_failed"] and _rating_failure(tally, s["rating"], cache_path):
                # A whole batch failed and the failures so far are over the fraction: the endpoint looks down.
                # The stage fails now rather than after every row's retries; a re-run resumes.
                break
    if writer is not None:
        writer.close()
    failure = _rating_failure(tally, s["rating"], cache_path) if uses_endpoint else None
    if failure:
        raise SelectError(failure)
    scoring_s = time.perf_counter() - t0
    n_dup = len(dup_records)
    n_read += n_dup
    n_bad = n_invalid + n_unscored + n_dup
    where = f"in {', '.join(paths)} ({n_bad} set aside: {_main_reasons(reasons)}; see {aside_path})"
    if n_valid == 0:  # whatever allow_fewer says: an empty selection trains nothing
        raise SelectError(f"no rows to select: 0 valid, scored rows {where}")
    if n_valid < k and not allow_fewer:
        raise SelectError(f"select.k={k} is larger than the pool: {n_valid} valid, scored rows {where}; lower k or "
                          "set select.allow_fewer=true")
    counts: dict[str, Any] = {"rows_read": n_read, "rows_kept": n_valid, "rows_set_aside": n_bad,
                              "rows_invalid": n_invalid, "rows_unscored": n_unscored, "rows_duplicate": n_dup,
                              "set_aside_reasons": reasons}
    if uses_endpoint:
        counts["rating_requests"] = {"rows": tally["rated"], "answered_earlier": tally["cached"],
                                     "failed": tally["failed"]}
    if dedup_counts is not None:
        counts["dedup"] = dedup_counts
    counts["duplicate_ids"] = duplicate_ids(scored_path, paths)
    if counts["duplicate_ids"]["rows"]:
        log.warning("select: %d kept rows share their id with another row (duplicate ids, e.g. %s); ids key the "
                    "random scorer, k-means sampling and training splits", counts["duplicate_ids"]["rows"],
                    counts["duplicate_ids"]["examples"])
    if selector == "top_k":
        selected = top.result()
        if selected.num_rows:
            selected = attach_messages(selected, shards, fmt)
    elif selector == "kmeans":
        selected, counts["kmeans"] = _kmeans(scored_path, k, s["clusters"], s["kmeans_fit_rows"], s["embedding"],
                                             batch_size, s["seed"], out_dir / "embeddings.parquet")
        selected = attach_messages(selected, shards, fmt)
    else:
        selected, counts["repr_filter"] = _repr_filter(scored_path, "score", k, s["tau"], s["embedding"], batch_size)
        if selected.num_rows < k and not allow_fewer:
            raise SelectError(
                f"only {selected.num_rows} of {n_valid} valid rows pass the repr filter at tau={s['tau']} (k={k}); "
                "raise select.tau, lower k or set select.allow_fewer=true"
            )
    selected = selected.append_column("rank", pa.array(range(1, selected.num_rows + 1), pa.int64()))
    pq.write_table(selected, out_dir / "selected.parquet")
    counts["rows_selected"] = selected.num_rows
    if n_bad:
        log.warning("select: %d of %d rows set aside (%s); see %s", n_bad, n_read, reasons, aside_path)
    scores = selected["score"] if selected.num_rows else pa.array([], pa.float64())
    outputs = {"selected": str(out_dir / "selected.parquet"), "scored": str(scored_path), "set_aside": str(aside_path)}
    if selector == "kmeans":
        outputs["embeddings"] = str(out_dir / "embeddings.parquet")
    exported, left_out = export_selection(selected, s["export"], out_dir)
    outputs.update(exported)
    if left_out:
        counts["export_set_aside"] = {fmt: len(rows) for fmt, rows in left_out.items()}
        for fmt, rows in left_out.items():
            log.warning("select: %d selected rows left out of the %s export (%s); see %s", len(rows), fmt,
                        rows[0]["error"], exported[f"export_{fmt}_set_aside"])
    metrics = {"files": paths, "scorers": s["scorers"], "ranking": ranking, "length_unit": s["length_unit"],
               "selector": selector, "read_and_score_s": round(scoring_s, 3),
               "select_s": round(time.perf_counter() - t0 - scoring_s, 3),
               "rows_per_s": round(n_read / scoring_s, 1) if scoring_s else None,
               "selected_score_min": pc.min(scores).as_py(), "selected_score_max": pc.max(scores).as_py()}
    from . import report as select_report

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
