"""Readers and normalisation on the real files in ../shared/data, and on every kind of bad row."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import shared, write_jsonl

from alignment import formats


@pytest.mark.parametrize("name", ["alpagasus_alpaca_1k.json", "evol_instruct_1k.json", "lima_1k.json"])
def test_real_sharegpt_files_normalise_with_their_own_ids(name):
    path = shared("sft", name)
    good, bad = formats.read_rows(str(path), "sft")
    raw = json.loads(path.read_text())
    assert len(good) + len(bad) == len(raw) == 1000
    assert not bad
    first = good[0]
    assert first["id"] == raw[0]["id"] and first["source"] == str(path) and first["row"] == 0
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][1]["content"] == raw[0]["conversations"][1]["value"]
    assert all(r["messages"][-1]["role"] == "assistant" for r in good)


def test_real_hh_rlhf_transcripts_become_prompt_chosen_rejected():
    path = shared("preferences", "hh_rlhf_harmless_base_test.jsonl.gz")
    good, bad = formats.read_rows(str(path), "preference")
    with gzip.open(path, "rt") as f:
        raw = [json.loads(line) for line in f]
    assert len(good) + len(bad) == len(raw) == 2312
    # rows whose final Assistant turn is empty, or whose turns do not alternate, are set aside with that
    # reason, not dropped
    assert bad and all(b["field"] in ("chosen", "rejected") for b in bad)
    assert {b["error"] for b in bad if not b["error"].startswith("two assistant turns in a row (turn ")} <= {
        "the final Assistant turn is empty", "chosen and rejected transcripts differ before their final Assistant turn"}
    assert sum(b["error"].startswith("two assistant turns in a row") for b in bad) == 9
    r = good[0]
    src = raw[r["row"]]
    assert r["prompt"][0]["role"] == "user" and r["prompt"][-1]["role"] == "user"
    assert src["chosen"].rstrip().endswith(r["chosen"]) and src["rejected"].rstrip().endswith(r["rejected"])
    multi = next(g for g in good if len(g["prompt"]) > 1)
    assert [m["role"] for m in multi["prompt"]][:2] == ["user", "assistant"]


@pytest.mark.parametrize("name,count", [("vicuna_test_set.jsonl", 80), ("koala_test_set.jsonl", 180),
                                        ("sinstruct_test_set.jsonl", 252), ("wizardlm_test_set.jsonl", 218),
                                        ("lima_test.jsonl", 300), ("mt_bench_questions.jsonl", 80),
                                        ("alpaca_eval_gpt4_1106_preview_reference.json", 805)])
def test_real_eval_prompt_sets(name, count):
    good, bad = formats.read_rows(str(shared("eval_prompts", name)), "eval")
    assert len(good) == count and not bad
    assert len({g["id"] for g in good}) == count
    assert all(g["messages"][-1]["role"] == "user" and g["messages"][-1]["content"].strip() for g in good)


def test_alpaca_input_is_appended_to_the_instruction():
    msgs = formats.normalise_sft({"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    assert msgs == [{"role": "user", "content": "Translate.\n\nHallo"}, {"role": "assistant", "content": "Hello"}]


def test_every_kind_of_bad_row_is_set_aside_with_its_field(tmp_path):
    rows = [
        {"id": "ok", "instruction": "Say hi.", "output": "Hi!"},
        "{not json",
        {"id": "no-output", "instruction": "Say hi."},
        {"id": "empty", "instruction": "Say hi.", "output": "   "},
        {"id": "no-instruction", "output": "Hi"},
        {"id": "wrong-type", "instruction": ["a"], "output": "b"},
        "",
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    good, bad = formats.read_rows(str(path), "sft")
    assert [g["id"] for g in good] == ["ok"]
    assert len(good) + len(bad) == len(rows)
    by_row = {b["row"]: b for b in bad}
    assert by_row[1]["field"] == "(json)" and "malformed JSON" in by_row[1]["error"]
    assert (by_row[2]["id"], by_row[2]["field"]) == ("no-output", "output")
    assert by_row[3]["field"] == "output" and "empty" in by_row[3]["error"]
    assert by_row[4]["field"] == "instruction" and by_row[4]["error"] == "missing"
    assert by_row[5]["field"] == "instruction" and "expected a string" in by_row[5]["error"]
    assert by_row[6]["field"] == "(json)" and by_row[6]["error"] == "empty line"
    assert all(b["source"] == str(path) for b in bad)


def test_bad_conversations(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"},
                           {"from": "human", "value": "and?"}]},
        {"conversations": []},
    ]
    good, bad = formats.read_rows(str(write_jsonl(tmp_path / "c.jsonl", rows)), "sft")
    assert len(good) == 1 and good[0]["id"] == "c.jsonl:0"  # no id field: file and row
    reasons = {b["row"]: (b["field"], b["error"]) for b in bad}
    assert reasons[1] == ("conversations", "no assistant turn")
    assert reasons[2] == ("conversations[1].from", "unknown role 'robot'")
    assert reasons[3][0] == "conversations[1].value"
    assert reasons[4][0] == "conversations[2]" and "ends with a user turn" in reasons[4][1]
    assert reasons[5][0] == "conversations"


def test_preference_pairs_formats():
    p = formats.normalise_preference({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert p == {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}
    uf = formats.normalise_preference({
        "prompt": "Q?",
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}],
    })
    assert uf == p
    implicit = formats.normalise_preference({
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}],
    })
    assert implicit == p
    with pytest.raises(formats.RowError) as e:
        formats.normalise_preference({"prompt": "Q?", "chosen": "good"})
    assert e.value.field == "rejected"


def test_missing_file_and_unknown_type_are_clear_errors(tmp_path):
    with pytest.raises(formats.DataError, match="not found: .*nope.jsonl"):
        formats.expand_paths([str(tmp_path / "nope.jsonl")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(formats.DataError, match="data.csv: unknown file type"):
        formats.plan_shards([str(tmp_path / "data.csv")])
    with pytest.raises(formats.DataError, match="glob .* matched no files"):
        formats.expand_paths([str(tmp_path / "*.parquet")])


def test_parquet_and_directory_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": f"q{i}", "output": "a" * i} for i in range(1, 6)]),
                   tmp_path / "part.parquet")
    write_jsonl(tmp_path / "more.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}])
    good, bad = formats.read_rows(str(tmp_path), "sft")
    assert len(good) == 6 and not bad
    assert {g["id"] for g in good} >= {"part.parquet:0", "more.jsonl:0"}


def test_shards_split_jsonl_by_row(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(10)])
    shards = formats.plan_shards([str(path)], rows_per_shard=4)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    assert [s.offset for s in shards] == [0, path.read_bytes().index(b'"q4"') - 16,
                                          path.read_bytes().index(b'"q8"') - 16]  # each shard seeks to its row
    rows = [r for s in shards for r in formats.read_shard(s, "sft")]
    assert [r["row"] for r in rows] == list(range(10))
    assert [r["messages"][0]["content"] for r in rows] == [f"q{i}" for i in range(10)]
    # a compressed file cannot seek: its shards skip lines, with the same result
    import gzip

    gz = tmp_path / "many.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    gz_shards = formats.plan_shards([str(gz)], rows_per_shard=4)
    assert [s.offset for s in gz_shards] == [-1, -1, -1]
    assert [r["messages"] for s in gz_shards for r in formats.read_shard(s, "sft")] == [r["messages"] for r in rows]
