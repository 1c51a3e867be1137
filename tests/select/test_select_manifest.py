"""Length scoring, top-k, the select stage on local Ray, and stage manifests."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared, write_jsonl

from alignment import formats, manifest, select
from alignment.config import SelectConfig
from alignment.select import embed, stage
from alignment.select.scorers import add_scorers
from alignment.select.scorers.length import length_scores
from alignment.select.selectors import TopK


def conv(*turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_length_counts_every_assistant_turn(tiny_model):
    from transformers import AutoTokenizer

    rows = [conv("q", "one two three"), conv("q", "four five", "more?", "six seven eight nine")]
    assert length_scores(rows, "chars") == [13, 9 + 20]
    assert length_scores(rows, "words") == [3, 6]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = [len(tok("one two three", add_special_tokens=False)["input_ids"]),
                len(tok("four five", add_special_tokens=False)["input_ids"])
                + len(tok("six seven eight nine", add_special_tokens=False)["input_ids"])]
    assert length_scores(rows, "tokens", tok) == expected


def test_topk_is_streamed_and_breaks_ties_by_id():
    top = TopK(3)
    batches = [
        [{"id": "b", "source": "f", "row": 0, "score": 5.0}, {"id": "z", "source": "f", "row": 1, "score": 1.0}],
        [{"id": "a", "source": "f", "row": 2, "score": 5.0}, {"id": "c", "source": "f", "row": 3, "score": 7.0}],
        [{"id": "d", "source": "f", "row": 4, "score": 5.0}],
    ]
    for b in batches:
        top.add(pa.Table.from_pylist(b))
        assert top.result().num_rows <= 3
    assert top.result()["id"].to_pylist() == ["c", "a", "b"]


def test_select_on_local_ray_with_real_data(ray_local, tmp_path, tiny_model):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "bad-empty", "instruction": "x", "output": " "}, "{oops",
        {"id": "good", "instruction": "x", "output": "a short answer"}])
    sources = [str(shared("sft", "lima_1k.json")), str(bad)]
    out1, out2 = tmp_path / "one", tmp_path / "two"
    out1.mkdir(), out2.mkdir()
    s, resolved = SelectConfig(k=25, length_unit="words"), select.Resolved(files=tuple(sources), format="auto", seed=0)
    r1 = select.run_select(s, resolved, out1)
    r2 = select.run_select(s, resolved, out2)
    c = r1["counts"]
    assert (c["rows_read"], c["rows_kept"], c["rows_set_aside"], c["rows_selected"]) == (1003, 1001, 2, 25)
    assert c["rows_read"] == c["rows_kept"] + c["rows_set_aside"]
    t = pq.read_table(r1["outputs"]["selected"])
    assert t.equals(pq.read_table(r2["outputs"]["selected"]))  # the same selection twice
    assert t["rank"].to_pylist() == list(range(1, 26))
    scores = t["score_length"].to_pylist()
    assert scores == t["score"].to_pylist()
    assert scores == sorted(scores, reverse=True)
    # the selection really is the 25 longest LIMA answers, traced to their source rows
    good, _ = formats.read_rows(str(shared("sft", "lima_1k.json")), "sft")
    lengths = sorted((sum(len(m["content"].split()) for m in g["messages"] if m["role"] == "assistant") for g in good),
                     reverse=True)
    assert scores == lengths[:25]
    raw = json.loads(shared("sft", "lima_1k.json").read_text())
    first = t.slice(0, 1).to_pylist()[0]
    assert raw[first["row"]]["id"] == first["id"]
    aside = [json.loads(line) for line in open(r1["outputs"]["set_aside"])]
    assert {(a["row"], a["field"]) for a in aside} == {(0, "output"), (1, "(json)")}


def test_scorers_run_inside_the_read_tasks_one_shard_each(ray_local, tmp_path):
    # Benchmark (a)'s speed rests on this: each read task scores its own shard (no object-store hop), and
    # shards are not bundled into one task (which a scorer batch size had done: no parallelism at all).
    paths = [str(write_jsonl(tmp_path / f"part-{j}.jsonl", [{"instruction": f"q{j}-{i}", "output": "a " * i}
                                                             for i in range(1, 40)])) for j in range(3)]
    s = SelectConfig(length_unit="words", scorers=["length", "random"])
    resolved = select.Resolved(files=tuple(paths), format="auto", seed=0)
    shards = formats.plan_shards(paths)
    tasks = stage.read_tasks(shards)
    ds = add_scorers(stage._rows(shards, s, resolved, tasks), s, resolved, tasks,
                     list(stage.ROWS_SCHEMA.names)).materialize()
    stats = ds.stats()
    fused = "MapBatches(read_batch)->MapBatches(score_length_batch)->MapBatches(score_random_batch)"
    assert f"{fused}: 3 tasks executed" in stats, stats
    assert ds.count() == 3 * 39
    assert sorted(ds.to_pandas()["score_length"]) == sorted(float(i) for i in range(1, 40) for _ in range(3))


def test_k_larger_than_the_pool_is_a_clear_error(ray_local, tmp_path):
    src = write_jsonl(tmp_path / "small.jsonl", [{"instruction": "q", "output": "a"}] * 3)
    resolved = select.Resolved(files=(str(src),), format="auto", seed=0)
    with pytest.raises(select.SelectError, match=r"select.k=5 is larger than the pool: 3 valid, scored rows"):
        select.run_select(SelectConfig(k=5, length_unit="chars"), resolved, tmp_path)
    r = select.run_select(SelectConfig(k=5, length_unit="chars", allow_fewer=True), resolved, tmp_path)
    assert r["counts"]["rows_selected"] == 3


def test_run_stage_skips_finished_work_and_records_failures(tmp_path):
    calls = []

    def work(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"outputs": {"out": str(d / "out.txt")}, "counts": {"n": 1}}

    m1 = manifest.run_stage(tmp_path, "demo", "a", {"k": 1}, {"in": "abc"}, work)
    m2 = manifest.run_stage(tmp_path, "demo", "a", {"k": 1}, {"in": "abc"}, work)
    assert len(calls) == 1 and m2["skipped"] and m2["dir"] == m1["dir"]
    assert m1["status"] == "complete" and m1["timings"]["seconds"] >= 0 and "torch" in m1["versions"]
    m3 = manifest.run_stage(tmp_path, "demo", "a", {"k": 1}, {"in": "changed"}, work)
    assert len(calls) == 2 and m3["dir"] != m1["dir"]

    def boom(d):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        manifest.run_stage(tmp_path, "demo", "b", {}, {}, boom)
    failed = [json.loads(p.read_text()) for p in (tmp_path / "demo").glob("b-*/manifest.json")]
    assert failed[0]["status"] == "failed" and "disk full" in failed[0]["error"]
    # a failed (or killed) stage runs again
    m4 = manifest.run_stage(tmp_path, "demo", "b", {}, {}, work)
    assert m4["status"] == "complete" and not m4["skipped"]


def test_fingerprint_follows_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    before = manifest.fingerprint(f)
    f.write_text("two")
    assert manifest.fingerprint(f) != before
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x").write_text("1")
    fd = manifest.fingerprint(d)
    (d / "y").write_text("2")
    assert manifest.fingerprint(d) != fd


def test_repr_filter_selector_on_local_ray_matches_the_rule(ray_local, tmp_path):
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    from alignment.select import diversity

    examples = Path(__file__).resolve().parents[2] / "examples" / "data" / "sft_alpaca.jsonl"
    rows = [json.loads(line) for line in open(examples)][:60]
    dups = [{**r, "id": r["id"] + "-dup"} for r in rows[:10]]  # exact duplicates under new ids
    src = write_jsonl(tmp_path / "pool.jsonl", rows + dups)
    emb = {"model": "all-minilm-l6-v2", "batch_size": 16, "num_actors": 1, "cpus_per_actor": 1.0,
           "gpus_per_actor": 0.0}
    s = SelectConfig(k=15, length_unit="words", selector="repr_filter", tau=0.9, embedding=emb, batch_size=8)
    r = select.run_select(s, select.Resolved(files=(str(src),), format="auto", seed=0,
                                             embedding_model="all-minilm-l6-v2"), tmp_path)
    got = pq.read_table(r["outputs"]["selected"])
    assert got.num_rows == 15 and got["rank"].to_pylist() == list(range(1, 16))
    assert got.schema.field("embedding").type.list_size == 384

    # the rule, in process: the same scored pool, ordered by score then id, embedded here
    pool = sorted(pq.read_table(r["outputs"]["scored"]).to_pylist(),
                  key=lambda x: (-x["score_length"], x["id"], x["source"], x["row"]))
    model = SentenceTransformer(embed.model_path("all-minilm-l6-v2"), device="cpu")
    e = model.encode([formats.conversation_text(x["messages"]) for x in pool], normalize_embeddings=True)
    assert got["id"].to_pylist() == [pool[i]["id"] for i in diversity.repr_filter_reference(e, 15, 0.9)]
    ids = set(got["id"].to_pylist())
    assert not any(i.endswith("-dup") and i[:-4] in ids for i in ids)
    c = r["counts"]["repr_filter"]
    assert c["kept"] == 15 and c["scanned"] == c["kept"] + c["rejected_as_similar"] and c["rejected_as_similar"] > 0
