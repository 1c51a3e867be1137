"""Readers for every instruction format, Hugging Face dataset sources, dedup and over-long rows in select."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shared, write_jsonl

from alignment import formats, select
from alignment.config import SelectConfig
from alignment.select import dedup, stage


def test_prompt_response_and_trl_prompt_completion_rows():
    rows = [
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Hello."}]},
    ]
    assert formats.normalise_sft(rows[0]) == [{"role": "user", "content": "Name a colour."},
                                              {"role": "assistant", "content": "Blue."}]
    assert [m["role"] for m in formats.normalise_sft(rows[1])] == ["system", "user", "assistant"]
    with pytest.raises(formats.RowError) as e:
        formats.normalise_sft({"prompt": "q", "completion": "  "})
    assert e.value.field == "completion"


def test_preference_files_as_instruction_data():
    """HH-RLHF transcripts (real file) and UltraFeedback-style pairs read as the prompt + the chosen answer."""
    good, bad = formats.read_rows([str(shared("preferences", "hh_rlhf_harmless_base_test.jsonl.gz"))], "sft")
    assert len(good) > 2000 and len(good) + len(bad) == 2312
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user" for r in good)
    assert {b["field"] for b in bad} <= {"chosen", "rejected"}
    uf = {"prompt": "2+2?", "prompt_id": "p1", "chosen": [{"role": "user", "content": "2+2?"},
                                                          {"role": "assistant", "content": "4"}],
          "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
          "score_chosen": 9.0, "score_rejected": 2.0}
    assert formats.normalise_sft(uf, formats.detect_sft_format(uf)) == uf["chosen"]


def test_hugging_face_dataset_source_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNMENT_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "my_dataset"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(7)])
    paths = formats.expand_paths([f"hf:{d}@train"])
    assert paths[0].endswith(".parquet") and str(tmp_path / "cache") in paths[0]
    assert formats.expand_paths([f"hf:{d}"]) == paths  # cached: the same file, not a second copy
    good, bad = formats.read_rows([f"hf:{d}"], "sft")
    assert [r["messages"][1]["content"] for r in good] == [f"answer {i}" for i in range(7)] and not bad
    with pytest.raises(formats.DataError, match="hf:/nowhere"):
        formats.expand_paths(["hf:/nowhere/at/all@train"])


def test_lsh_parameters_and_minhash_similarity():
    b, r = dedup.lsh_params(0.8, 128)
    assert b * r <= 128 and r > 1
    hasher = dedup.MinHasher(128, 3, b, r)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    a = [rng.choice(words) for _ in range(300)]
    near = list(a)
    near[150] = "changed"
    other = [rng.choice(words) for _ in range(300)]
    sa, sn, so = (hasher.signature(x) for x in (a, near, other))
    assert (sa == sn).mean() > 0.9 and (sa == so).mean() < 0.1  # agreement estimates Jaccard
    assert (hasher.band_hashes(sa) == hasher.band_hashes(sn)).any()


def test_find_duplicates_keeps_the_first_row_of_each_group():
    exact = np.array([5, 7, 5, 9, 7, 11], np.uint64)
    bands = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [50, 6]], np.uint64)  # row 5 shares a band with 3
    order = np.array([40, 10, 30, 20, 0, 50])  # file/row order: 4, 1, 3, 2, 0, 5
    dup, of, kind = dedup.find_duplicates(order, exact, bands)
    got = {int(d): (int(o), int(k)) for d, o, k in zip(dup, of, kind)}
    assert got == {1: (4, 0), 0: (2, 0), 5: (3, 1)}
    dup, _, _ = dedup.find_duplicates(order, exact, None)
    assert sorted(dup.tolist()) == [0, 1]


def _pool_with_duplicates_and_an_over_long_row(tmp_path):
    rng = random.Random(1)
    words = [f"word{i}" for i in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(20)]
    rows = [{"id": f"r{i}", "instruction": f"Question {i}", "output": t} for i, t in enumerate(texts)]
    rows.append({"id": "exact-copy", "instruction": "QUESTION 3!", "output": texts[3].upper()})  # same normalised text
    near = texts[5].split()
    near[30] = "different"
    rows.append({"id": "near-copy", "instruction": "Question 5", "output": " ".join(near)})
    rows.append({"id": "too-long", "instruction": "Question long", "output": " ".join(words[:1000])})
    return write_jsonl(tmp_path / "pool.jsonl", rows)


def test_select_dedup_and_over_long_rows_are_set_aside(ray_local, tmp_path, tiny_model):
    src = _pool_with_duplicates_and_an_over_long_row(tmp_path)
    s = SelectConfig(k=5, length_unit="words", max_tokens=2000, dedup={"mode": "near", "threshold": 0.7, "ngram": 3})
    out = tmp_path / "out"
    out.mkdir()
    res = select.run_select(s, select.Resolved(files=(str(src),), format="auto", seed=0, tokenizer=str(tiny_model)),
                            out)
    c = res["counts"]
    assert (c["rows_read"], c["rows_duplicate"], c["rows_invalid"]) == (23, 2, 1)
    assert c["dedup"]["exact"] == 1 and c["dedup"]["near"] == 1
    assert c["rows_read"] == c["rows_kept"] + c["rows_set_aside"] and c["rows_kept"] == 20
    aside = {r["id"]: r for r in map(json.loads, open(out / "set_aside.jsonl"))}
    assert aside["exact-copy"]["error"].startswith("exact duplicate of r3")
    assert aside["near-copy"]["error"].startswith("near duplicate") and "of r5" in aside["near-copy"]["error"]
    assert aside["too-long"]["field"] == "messages" and "over-long" in aside["too-long"]["error"]
    ids = set(pq.read_table(out / "selected.parquet")["id"].to_pylist())
    assert not ids & {"exact-copy", "near-copy", "too-long"}
    exported = [json.loads(x) for x in open(res["outputs"]["export_trl"])]
    assert [r["id"] for r in exported] == pq.read_table(out / "selected.parquet")["id"].to_pylist()
    report = open(res["outputs"]["report"]).read()
    assert "| duplicate | 2 |" in report and "1 exact and 1 near duplicates removed" in report
    assert (out / "select_report.png").stat().st_size > 10_000


def test_with_dedup_the_length_check_runs_once(ray_local, tmp_path, tiny_model):
    # The dedup pass finds the over-long rows (they take no part in dedup); the scoring pass marks them from
    # its list instead of templating and tokenizing every row again (a bad tokenizer path proves it is unused).
    src = str(_pool_with_duplicates_and_an_over_long_row(tmp_path))
    s = SelectConfig(length_unit="words", max_tokens=2000, dedup={"mode": "exact"})
    resolved = select.Resolved(files=(src,), format="auto", seed=0, tokenizer=str(tiny_model))
    shards = formats.plan_shards([src])
    tasks = stage.read_tasks(shards)
    skip, records, counts, over_long = stage._dedup(shards, [src], s, resolved, tasks)
    assert [r["id"] for r in records] == ["exact-copy"] and skip == {src: {20}}
    assert list(over_long) == [src] and list(over_long[src]) == [22]
    assert over_long[src][22].startswith("over-long: ") and "> select.max_tokens=2000" in over_long[src][22]
    ds = stage._rows(shards, s, replace(resolved, tokenizer=str(tmp_path / "no-such-tokenizer")), tasks, skip,
                     over_long).materialize()
    assert "check_length_batch" not in ds.stats() and "mark_over_long_batch" in ds.stats()
    rows = {r["id"]: r for r in ds.to_pandas().to_dict("records")}
    assert len(rows) == 22 and "exact-copy" not in rows
    assert (rows["too-long"]["field"], rows["too-long"]["error"]) == ("messages", over_long[src][22])
    assert sum(r["error"] is not None for r in rows.values()) == 1


def test_hidden_state_embeddings_last_token_and_mean(tiny_model):
    """Right-padded batches give each conversation the embedding it gets alone; last_token is the final
    layer at the last real token, mean the average over real tokens."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from alignment.select import embed

    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="right")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModel.from_pretrained(tiny_model).eval()
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"}],
             [{"role": "user", "content": "a much longer question about rivers and their water"},
              {"role": "assistant", "content": "ok"}]]
    for pooling in ("last_token", "mean"):
        batched = embed.hidden_state_embeddings(model, tok, convs, pooling, 512, batch_size=2)
        alone = np.concatenate([embed.hidden_state_embeddings(model, tok, [c], pooling, 512, 1) for c in convs])
        np.testing.assert_allclose(batched, alone, atol=1e-5)
        assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    ids = tok(tok.apply_chat_template(convs[0], tokenize=False), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        h = model(**ids).last_hidden_state[0]
    last = embed.hidden_state_embeddings(model, tok, convs[:1], "last_token", 512, 1)[0]
    mean = embed.hidden_state_embeddings(model, tok, convs[:1], "mean", 512, 1)[0]
    np.testing.assert_allclose(last, (h[-1] / h[-1].norm()).numpy(), atol=1e-5)
    np.testing.assert_allclose(mean, (h.mean(0) / h.mean(0).norm()).numpy(), atol=1e-5)


def test_kmeans_selector_samples_evenly_across_clusters(ray_local, tmp_path, tiny_model):
    """Three topics of very different sizes and scores: top_k takes the long-answer topic only; kmeans takes
    rows from every topic, the best-scored of each first, and is the same twice."""
    topics = {"cooking": ("pan", "salt", "oven", "bake", "flour"), "rivers": ("water", "delta", "flow", "bank", "fish"),
              "code": ("python", "loop", "list", "bug", "compile")}
    rows, rng = [], random.Random(0)
    for name, vocab in topics.items():
        n, length = {"cooking": 30, "rivers": 6, "code": 6}[name], {"cooking": 40, "rivers": 10, "code": 5}[name]
        for i in range(n):
            rows.append({"id": f"{name}-{i:02d}", "instruction": f"Tell me about {name}.",
                         "output": " ".join(rng.choice(vocab) for _ in range(length + i))})
    src = write_jsonl(tmp_path / "topics.jsonl", rows)
    picks = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        out.mkdir()
        s = SelectConfig(k=6, length_unit="words", selector="kmeans", clusters=3, embedding={"kind": "mean"})
        res = select.run_select(s, select.Resolved(files=(str(src),), format="auto", seed=0,
                                                   embedding_model=str(tiny_model)), out)
        t = pq.read_table(out / "selected.parquet")
        picks.append(t["id"].to_pylist())
        km = res["counts"]["kmeans"]
        assert km["clusters"] == 3 and sum(km["pool_per_cluster"]) == 42 and sum(km["selected_per_cluster"]) == 6
        assert (out / "embeddings.parquet").exists()
        assert "covers 3 of them" in open(res["outputs"]["report"]).read()
    assert picks[0] == picks[1]
    assert t["rank"].to_pylist() == list(range(1, 7)) and "messages" in t.column_names
    assert {i.split("-")[0] for i in picks[0]} == set(topics)  # top_k would take 6 cooking rows
    # every cluster's best-scored row is in
    labels = dict(zip(t["id"].to_pylist(), t["cluster"].to_pylist()))
    assert sorted(labels.values()).count(labels[picks[0][0]]) <= 2


def test_exports_round_trip_through_the_readers(tmp_path):
    single = {"id": "a", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                                      {"role": "assistant", "content": "Hello."}]}
    multi = {"id": "b", "messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "one"},
                                     {"role": "user", "content": "2?"}, {"role": "assistant", "content": "two"}]}
    for fmt in ("trl", "sharegpt", "alpaca"):
        rows = [single] if fmt == "alpaca" else [single, multi]
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [formats.export_row(r, fmt) for r in rows])
        good, bad = formats.read_rows([str(path)], "sft")
        assert not bad and [g["messages"] for g in good] == [r["messages"] for r in rows]
        assert [g["id"] for g in good] == [r["id"] for r in rows]
    with pytest.raises(formats.RowError, match="row b has 2 user/assistant exchanges"):
        formats.export_row(multi, "alpaca")


def test_new_select_keys_are_validated():
    from alignment.config import ConfigError, SelectConfig

    assert SelectConfig(selector="kmeans", clusters=7).clusters == 7
    assert SelectConfig(embedding={"kind": "mean"}).embedding.model_name("my-model") == "my-model"
    assert SelectConfig().embedding.model_name("my-model") == "all-minilm-l6-v2"
    for bad in ({"dedup": {"mode": "fuzzy"}}, {"dedup": {"threshold": 1.5}}, {"export": ["csv"]},
                {"embedding": {"kind": "cls"}}, {"max_tokens": 0}):
        with pytest.raises((ValueError, ConfigError)):
            SelectConfig(**bad)
