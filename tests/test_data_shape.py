"""Data that is wrong in shape or cannot be read: turn order, ids, the run directory among the data, stale
manifests, odd file names, byte-order marks, URIs with options, the Alpaca export, unreadable files."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_jsonl

from alignment import formats, manifest, select
from alignment.config import SelectConfig
from alignment.select import stage
from alignment.select.rows import MESSAGES_TYPE
from alignment.select.scorers.random import random_scores


def msgs(*roles: str) -> list[dict]:
    return [{"role": r, "content": f"{r} turn {i}"} for i, r in enumerate(roles)]


def sharegpt(*speakers: str) -> list[dict]:
    return [{"from": s, "value": f"{s} says {i}"} for i, s in enumerate(speakers)]


# ------------------------------------------------------------------------------------------ turn order


@pytest.mark.parametrize("row,field,reason", [
    ({"messages": msgs("user", "user", "assistant")}, "messages[1]", "two user turns in a row"),
    ({"messages": msgs("user", "assistant", "assistant")}, "messages[2]", "two assistant turns in a row"),
    ({"conversations": sharegpt("gpt", "human", "gpt")}, "conversations[0]", "starts with an assistant turn"),
    ({"messages": msgs("system", "assistant")}, "messages[1]", "starts with an assistant turn"),
    ({"messages": msgs("assistant")}, "messages[0]", "starts with an assistant turn"),
    ({"messages": msgs("user", "system", "assistant")}, "messages[1]", "a system turn is only allowed first"),
    ({"prompt": "Hi", "completion": msgs("assistant", "assistant")}, "completion[1]", "two assistant turns in a row"),
    ({"prompt": msgs("user", "user"), "completion": "ok"}, "prompt[1]", "two user turns in a row"),
])
def test_instruction_turns_out_of_order_are_set_aside_naming_the_turn(row, field, reason):
    with pytest.raises(formats.RowError) as e:
        formats.normalise_sft(row)
    assert e.value.field == field and e.value.reason.startswith(reason)


def test_turn_order_rows_are_set_aside_by_the_reader_and_counted(tmp_path):
    rows = [{"messages": msgs("user", "assistant", "user", "assistant")},
            {"messages": msgs("user", "user", "assistant")}, {"messages": msgs("system", "user", "assistant")},
            {"messages": msgs("assistant")}]
    good, bad = formats.read_rows(str(write_jsonl(tmp_path / "chat.jsonl", rows)), "sft")
    assert [g["row"] for g in good] == [0, 2] and len(good) + len(bad) == len(rows)
    assert {b["row"]: (b["field"], b["error"]) for b in bad} == {
        1: ("messages[1]", "two user turns in a row"), 3: ("messages[0]", "starts with an assistant turn")}


@pytest.mark.parametrize("row,field,reason", [
    ({"prompt": msgs("user", "user"), "chosen": "a", "rejected": "b"}, "prompt[1]", "two user turns in a row"),
    ({"prompt": msgs("assistant", "user"), "chosen": "a", "rejected": "b"}, "prompt[0]",
     "starts with an assistant turn"),
    ({"chosen": msgs("user", "user", "assistant"), "rejected": msgs("user", "user", "assistant")}, "chosen[1]",
     "two user turns in a row"),
    ({"prompt": msgs("system", "assistant", "user"), "completion": "a", "label": True}, "prompt[1]",
     "starts with an assistant turn"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: one\n\nAssistant: two\n\nHuman: so?\n\nAssistant: yes",
      "rejected": "\n\nHuman: hi\n\nAssistant: one\n\nAssistant: two\n\nHuman: so?\n\nAssistant: no"}, "chosen",
     "two assistant turns in a row"),
])
def test_preference_prompts_must_alternate(row, field, reason):
    with pytest.raises(formats.RowError) as e:
        formats.normalise_preference(row)
    assert e.value.field == field and e.value.reason.startswith(reason)


def test_eval_prompts_must_alternate():
    assert formats.normalise_eval_prompt({"messages": msgs("system", "user", "assistant")}) == msgs("system", "user")
    for roles, field, reason in ((("assistant", "user"), "messages[0]", "starts with an assistant turn"),
                                 (("user", "user"), "messages[1]", "two user turns in a row")):
        with pytest.raises(formats.RowError) as e:
            formats.normalise_eval_prompt({"messages": msgs(*roles)})
        assert (e.value.field, e.value.reason) == (field, reason)


# ------------------------------------------------------------------------------------------------- ids


def test_fallback_ids_tell_files_of_the_same_name_apart(tmp_path):
    rows = [{"instruction": "q", "output": "a"}]
    a, b = write_jsonl(tmp_path / "a" / "train.jsonl", rows), write_jsonl(tmp_path / "b" / "train.jsonl", rows)
    other = write_jsonl(tmp_path / "b" / "other.jsonl", rows)
    good, bad = formats.read_rows([str(a), str(b), str(other)], "sft")
    assert [g["id"] for g in good] == ["a/train.jsonl:0", "b/train.jsonl:0", "other.jsonl:0"] and not bad
    assert formats.read_rows(str(a), "sft")[0][0]["id"] == "train.jsonl:0"  # a unique name stays the file name
    # relative to the inputs alone: the same ids wherever the data lies (they seed random scores and subsets)
    elsewhere = formats.file_labels(["/data/x/a/train.jsonl", "/data/x/b/train.jsonl", "s3://bucket/c/train.jsonl"])
    assert list(elsewhere.values()) == ["a/train.jsonl", "b/train.jsonl", "c/train.jsonl"]
    assert formats.file_labels(["/r/a/x/t.jsonl", "/r/b/x/t.jsonl", "/r/u.jsonl"]) == {
        "/r/a/x/t.jsonl": "a/x/t.jsonl", "/r/b/x/t.jsonl": "b/x/t.jsonl", "/r/u.jsonl": "u.jsonl"}


def test_the_select_read_path_uses_the_same_ids(tmp_path):
    """Ray Data passes shards as dicts: the label survives the round trip and names the rows."""
    rows = [{"instruction": "q", "output": "a"}]
    paths = [str(write_jsonl(tmp_path / d / "train.jsonl", rows)) for d in ("a", "b")]
    shards = formats.plan_shards(paths)
    assert [formats.Shard.from_dict(s.to_dict()) for s in shards] == shards
    batch = {k: [s.to_dict()[k] for s in shards] for k in shards[0].to_dict()}
    (table,) = list(stage.read_batch(batch, "auto"))
    ids = table["id"].to_pylist()
    assert ids == ["a/train.jsonl:0", "b/train.jsonl:0"]
    assert len(set(random_scores(ids, 0))) == 2


def test_duplicate_ids_are_set_aside_naming_the_first(tmp_path, caplog):
    one = write_jsonl(tmp_path / "one.jsonl", [{"id": "q1", "prompt": "a?", "chosen": "x", "rejected": "y"},
                                               {"id": "q2", "prompt": "b?", "chosen": "x", "rejected": "y"}])
    two = write_jsonl(tmp_path / "two.jsonl", [{"id": "q1", "prompt": "c?", "chosen": "x", "rejected": "y"},
                                               {"id": "q1", "prompt": "d?", "chosen": "x", "rejected": "y"}])
    with caplog.at_level(logging.WARNING, logger="alignment"):
        good, bad = formats.read_rows([str(one), str(two)], "preference")
    assert [g["id"] for g in good] == ["q1", "q2"] and good[0]["prompt"][0]["content"] == "a?"
    assert len(good) + len(bad) == 4
    assert [(b["source"], b["row"], b["field"]) for b in bad] == [(str(two), 0, "id"), (str(two), 1, "id")]
    assert all(f"{one}:0" in b["error"] and "duplicate id" in b["error"] for b in bad)
    assert "2 rows" in caplog.text and "duplicate id" in caplog.text


def test_select_counts_duplicate_ids_sets_aside_bad_turns_and_exports(ray_local, tmp_path, caplog):
    """One select run: fallback ids of same-named files differ (and so do their random scores), duplicate ids
    are reported, a turn-order row is set aside, a multi-turn row is left out of the Alpaca export only."""
    plain = [{"instruction": f"q{i}", "output": "w " * (i + 2)} for i in range(2)]
    write_jsonl(tmp_path / "data" / "a" / "train.jsonl", plain)
    write_jsonl(tmp_path / "data" / "b" / "train.jsonl", plain)
    write_jsonl(tmp_path / "data" / "ids.jsonl", [{"id": "dup", "instruction": "first", "output": "x y"},
                                                  {"id": "dup", "instruction": "second", "output": "x y z"}])
    write_jsonl(tmp_path / "data" / "chat.jsonl", [
        {"id": "multi", "messages": [*msgs("user", "assistant"), {"role": "user", "content": "more?"},
                                     {"role": "assistant", "content": "long " * 30}]},
        {"id": "user-user", "messages": [*msgs("user", "user"), {"role": "assistant", "content": "longest " * 50}]}])
    out = tmp_path / "out"
    out.mkdir()
    s = SelectConfig(k=7, scorers=["length", "random"], length_unit="words", export=["trl", "alpaca"])
    with caplog.at_level(logging.WARNING, logger="alignment"):
        res = select.run_select(s, select.Resolved(files=(str(tmp_path / "data"),), format="auto", seed=0), out)
    c = res["counts"]
    assert (c["rows_read"], c["rows_kept"], c["rows_set_aside"], c["rows_selected"]) == (8, 7, 1, 7)
    aside = [json.loads(x) for x in open(out / "set_aside.jsonl")]
    assert [(a["id"], a["field"], a["error"]) for a in aside] == [
        ("user-user", "messages[1]", "two user turns in a row")]
    scored = {r["id"]: r for r in pq.read_table(out / "scored.parquet").to_pylist()}
    assert {"a/train.jsonl:0", "b/train.jsonl:0", "a/train.jsonl:1", "b/train.jsonl:1"} <= set(scored)
    assert scored["a/train.jsonl:0"]["score_random"] != scored["b/train.jsonl:0"]["score_random"]
    assert c["duplicate_ids"]["rows"] == 1 and c["duplicate_ids"]["ids"] == 1
    assert c["duplicate_ids"]["examples"] == {"dup": [f"{tmp_path / 'data' / 'ids.jsonl'}:0",
                                                      f"{tmp_path / 'data' / 'ids.jsonl'}:1"]}
    assert "duplicate id" in caplog.text and "dup" in caplog.text
    report = open(res["outputs"]["report"]).read()
    assert "share their id" in report and "`dup`" in report
    # the multi-turn row: in the trl export, left out of the Alpaca one (counted, listed)
    assert c["export_set_aside"] == {"alpaca": 1}
    trl = [json.loads(x)["id"] for x in open(res["outputs"]["export_trl"])]
    alpaca = [json.loads(x)["id"] for x in open(res["outputs"]["export_alpaca"])]
    assert "multi" in trl and len(trl) == 7 and alpaca == [i for i in trl if i != "multi"]
    left = [json.loads(x) for x in open(res["outputs"]["export_alpaca_set_aside"])]
    assert [(x["id"], x["rank"]) for x in left] == [("multi", trl.index("multi") + 1)]
    assert "Alpaca" in left[0]["error"] and "left out of the alpaca export" in report


def test_alpaca_export_leaves_out_a_multi_turn_row_only(tmp_path):
    rows = [{"id": "one", "messages": msgs("user", "assistant")},
            {"id": "two", "messages": msgs("user", "assistant", "user", "assistant")}]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("messages", MESSAGES_TYPE)]))
    outputs, left = stage.export_selection(table, ["sharegpt", "alpaca"], tmp_path)
    assert [json.loads(x)["id"] for x in open(outputs["export_sharegpt"])] == ["one", "two"]
    assert [json.loads(x)["id"] for x in open(outputs["export_alpaca"])] == ["one"]
    assert [(x["id"], x["rank"]) for x in left["alpaca"]] == [("two", 2)] and "sharegpt" not in left


# ------------------------------------------------------------------------------- the run directory


def test_the_run_directory_is_never_read_as_input(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"instruction": "q", "output": "a"}])
    write_jsonl(data / "runs" / "select" / "k1-x" / "selected.trl.jsonl", [{"messages": msgs("user", "assistant")}])
    (data / "runs" / "select" / "k1-x" / "manifest.json").write_text("{}")
    assert formats.expand_paths([str(data)], exclude=[str(data / "runs")]) == [str(data / "train.jsonl")]
    assert formats.expand_paths([str(data / "**" / "*.jsonl")], exclude=[str(data / "runs")]) == [
        str(data / "train.jsonl")]


def test_select_stage_with_its_run_dir_inside_the_data(ray_local, tmp_path):
    from alignment import pipeline
    from alignment.config import load_config

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"instruction": f"q{i}", "output": "w " * (i + 1)} for i in range(5)])
    exp = {"run_dir": str(data / "run"), "data": {"sft": [str(data)]},
           "select": {"k": 3, "length_unit": "words", "export": ["trl"]}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    first = pipeline.select_stage(load_config(tmp_path / "exp.yaml"))
    assert first["counts"]["rows_read"] == 5 and first["metrics"]["files"] == [str(data / "train.jsonl")]
    again = pipeline.select_stage(load_config(tmp_path / "exp.yaml"))  # the run's own outputs are no new input
    assert again["skipped"] and again["dir"] == first["dir"]


# ------------------------------------------------------------------------------------------- manifests


def test_a_finished_stage_whose_outputs_are_gone_runs_again(tmp_path, caplog):
    calls = []

    def work(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"outputs": {"out": str(d / "out.txt"), "remote": "s3://bucket/x", "name": "smollm2"}, "counts": {}}

    first = manifest.run_stage(tmp_path, "demo", "a", {}, {}, work)
    assert manifest.run_stage(tmp_path, "demo", "a", {}, {}, work)["skipped"]
    Path(first["outputs"]["out"]).unlink()
    with caplog.at_level(logging.INFO, logger="alignment"):
        again = manifest.run_stage(tmp_path, "demo", "a", {}, {}, work)
    assert not again["skipped"] and len(calls) == 2 and Path(again["outputs"]["out"]).is_file()
    assert "out.txt" in caplog.text and "no longer exists" in caplog.text


# ------------------------------------------------------------------------------------- files and names


def test_a_file_name_with_a_bracket_is_a_file_not_a_glob(tmp_path):
    path = write_jsonl(tmp_path / "data[1].jsonl", [{"instruction": "q", "output": "a"}])
    write_jsonl(tmp_path / "data1.jsonl", [{"instruction": "other", "output": "b"}])
    assert formats.expand_paths([str(path)]) == [str(path)]
    good, _ = formats.read_rows(str(path), "sft")
    assert [g["messages"][0]["content"] for g in good] == ["q"]


def test_a_utf8_byte_order_mark_costs_no_row(tmp_path):
    rows = [{"instruction": "first", "output": "a"}, {"instruction": "second", "output": "b"}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    for path in (jsonl, as_json, gz):
        good, bad = formats.read_rows(str(path), "sft")
        assert [g["messages"][0]["content"] for g in good] == ["first", "second"] and not bad, path


def test_a_uri_with_options_is_read_through_pyarrow(s3_storage):
    uri, fs = s3_storage
    bucket, options = uri.split("://", 1)[1].split("/", 1)[0], uri.split("?", 1)[1]
    body = "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(3)).encode()
    with fs.open_output_stream(f"{bucket}/data/train.jsonl") as f:
        f.write(body)
    with fs.open_output_stream(f"{bucket}/data/more.jsonl.gz") as f:
        f.write(gzip.compress(body))
    plain, packed = (f"s3://{bucket}/data/{name}?{options}" for name in ("train.jsonl", "more.jsonl.gz"))
    assert formats.file_kind(plain) == "jsonl" and formats.file_kind(packed) == "jsonl"
    good, bad = formats.read_rows([plain, packed], "sft")
    assert [g["id"] for g in good] == [f"{n}:{i}" for n in ("train.jsonl", "more.jsonl.gz") for i in range(3)]
    assert not bad and good[0]["source"] == plain


# ------------------------------------------------------------------------------------ unreadable files


def _unreadable(tmp_path: Path) -> dict[str, Path]:
    good = "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(500)).encode()
    files = {"corrupt gzip": tmp_path / "corrupt.jsonl.gz", "truncated gzip": tmp_path / "truncated.jsonl.gz",
             "not Parquet": tmp_path / "fake.parquet", "not UTF-8": tmp_path / "latin1.json",
             "not JSON": tmp_path / "broken.json"}
    files["corrupt gzip"].write_bytes(b"this is not gzip at all\n" * 10)
    files["truncated gzip"].write_bytes(gzip.compress(good)[:200])
    files["not Parquet"].write_bytes(good)
    files["not UTF-8"].write_bytes('[{"instruction": "caf\u00e9", "output": "a"}]'.encode("latin-1"))
    files["not JSON"].write_text('[{"instruction": "q", "output": "a"},\n')
    return files


@pytest.mark.parametrize("what", ["corrupt gzip", "truncated gzip", "not Parquet", "not UTF-8", "not JSON"])
def test_an_unreadable_file_is_one_data_error_naming_it(tmp_path, what):
    path = _unreadable(tmp_path)[what]
    with pytest.raises(formats.DataError) as e:
        formats.plan_shards([str(path)])  # on the driver, before any Ray task
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_jsonl_line_that_is_not_utf8_is_set_aside_naming_its_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"instruction": "q", "output": "a"}\n' + '{"instruction": "caf\u00e9", "output": "a"}\n'
                     .encode("latin-1"))
    good, bad = formats.read_rows(str(path), "sft")
    assert [g["row"] for g in good] == [0]
    assert [(b["row"], b["field"]) for b in bad] == [(1, "(json)")] and "UTF-8" in bad[0]["error"]


def test_json_lines_in_a_json_file_are_read_as_json_lines(tmp_path, caplog):
    path = write_jsonl(tmp_path / "rows.json", [{"instruction": f"q{i}", "output": "a"} for i in range(3)] + ["{oops"])
    with caplog.at_level(logging.INFO, logger="alignment"):
        shards = formats.plan_shards([str(path)])
        good, bad = formats.read_rows(str(path), "sft")
    assert [s.kind for s in shards] == ["jsonl"] and "JSON Lines" in caplog.text
    assert [g["id"] for g in good] == ["rows.json:0", "rows.json:1", "rows.json:2"]
    assert [(b["row"], b["field"]) for b in bad] == [(3, "(json)")]


def test_the_cli_reports_an_unreadable_file_in_one_line(ray_local, tmp_path, capsys):
    from alignment import cli

    bad = _unreadable(tmp_path)["truncated gzip"]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"sft": [str(bad)]},
                                                       "select": {"k": 2, "length_unit": "words"}}))
    assert cli.main(["select", "--config", str(tmp_path / "exp.yaml")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(bad) in err[0]
