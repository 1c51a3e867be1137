"""AlpacaEval 2's judge (``alpaca_eval``) on the 805-row AlpacaEval set against a fake endpoint that returns
log-probabilities: what it sends and every number it reports equal what the alpaca_eval package itself sends and
computes for the same rows and the same judgements (its own PairwiseAnnotator, run here with its OpenAI call
replaced); the length-controlled win rate with a hand-built Hugging Face cache, and without it; endpoints that
leave log-probabilities out; the local judge's top log-probabilities against a forward pass."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pandas as pd
import pytest
from conftest import chat_completion, shared, write_jsonl

from alignment import endpoints, formats, pipeline
from alignment.config import ExperimentConfig, GenerateConfig
from alignment.endpoints import GenerationError
from alignment.evaluate import JUDGES
from alignment.evaluate import alpaca_eval as ae
from alignment.evaluate.generate import HFNextToken, next_token_logprobs, vllm_top_logprobs

pytest.importorskip("alpaca_eval")

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
JUDGE_MODEL = "gpt-4-1106-preview"
SAME = (3, 400)  # rows whose two answers are identical: alpaca_eval's 1.5, unjudged
OUTPUTS = re.compile(r'"model_identifier": "m",\s*"output": """(.*?)"""\s*\},\s*\{\s*"model_identifier": "M",\s*'
                     r'"output": """(.*?)"""', re.DOTALL)
OTHERS = [{"token": "Both", "logprob": -9.5}, {"token": "The", "logprob": -11.0}, {"token": "Model", "logprob": -12.0}]


def reference_path():
    return shared("eval_prompts", "alpaca_eval_gpt4_1106_preview_reference.json")


def judge_top(messages: list[dict]) -> list[dict]:
    """The fake judge's top-5 log-probabilities of its first token, from the prompt: the longer output is likelier
    (a length bias for the GLM to remove), shifted by a hash; some prompts get m or M alone, " m" (a space: not m
    to alpaca_eval's parser), or neither (unparsed)."""
    text = messages[-1]["content"]
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    m = OUTPUTS.search(text)
    z = ((len(m[1]) - len(m[2])) / 400 if m else 0.0) + ((h % 1000) / 1000 - 0.5) * 3
    p_m = min(max(1 / (1 + math.exp(-z)), 1e-6), 1 - 1e-6)
    kind = h % 31
    if kind == 0:
        return list(OTHERS)
    if kind == 1:
        return [{"token": "M", "logprob": -0.01}, *OTHERS]
    if kind == 2:
        return [{"token": " m", "logprob": -0.2}, {"token": "M", "logprob": -2.0}, *OTHERS]
    pair = [{"token": "m", "logprob": math.log(p_m)}, {"token": "M", "logprob": math.log(1 - p_m)}]
    return sorted([*pair, *OTHERS], key=lambda t: -t["logprob"])[:5]


def endpoint_reply(body: dict) -> dict:
    top = judge_top(body["messages"])
    return chat_completion(top[0]["token"], top, completion_tokens=1)


def target_answer(i: int, instruction: str, baseline: str) -> str:
    if i in SAME:
        return baseline
    n = int(hashlib.sha256(f"len{i}".encode()).hexdigest(), 16) % 300
    return f"An answer to: {instruction[:60]}\n" + " ".join(["detail"] * n)


@pytest.fixture(scope="module")
def questions805() -> list[dict]:
    """The 805 rows as the pipeline reads them (ids from formats.row_id: ``<file>:<row>``)."""
    rows, bad = formats.read_rows(str(reference_path()), "eval")
    assert len(rows) == 805 and not bad
    return [{"id": r["id"], "messages": r["messages"]} for r in rows]


@pytest.fixture(scope="module")
def ae805(questions805):
    """The 805 rows, the two models' answers (the baseline: the reference file's gpt4_1106_preview outputs), and
    alpaca_eval's own annotations of them: its PairwiseAnnotator's annotate_head2head, with its OpenAI call
    (``_openai_completion_helper``) answering as the fake judge does, every request it would send kept."""
    import alpaca_eval.decoders.openai as oa
    from alpaca_eval.annotators import PairwiseAnnotator

    raw = json.loads(reference_path().read_text())
    questions = questions805
    baseline = {q["id"]: r["output"] for q, r in zip(questions, raw, strict=True)}
    target = {q["id"]: target_answer(i, r["instruction"], r["output"])
              for i, (q, r) in enumerate(zip(questions, raw, strict=True))}
    sent = []

    def helper(args, **kwargs):
        (messages,), max_tokens = args
        sent.append({"messages": messages, "max_tokens": max_tokens, **kwargs})
        top = judge_top(messages)
        first = {"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}
        return [{"text": top[0]["token"], "logprobs": {"content": [first]}, "total_tokens": 1.0}]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oa, "_openai_completion_helper", helper)
        own = PairwiseAnnotator(annotators_config=ANNOTATOR, caching_path=None)
        annotations = own.annotate_head2head(
            outputs_1=[{"instruction": r["instruction"], "output": r["output"], "generator": "baseline"} for r in raw],
            outputs_2=[{"instruction": r["instruction"], "output": target[q["id"]], "generator": "target"}
                       for q, r in zip(questions, raw, strict=True)])
    df = pd.DataFrame(annotations)
    assert list(df["instruction"]) == [r["instruction"] for r in raw]  # in the set's order: row i is index i
    df["index"] = range(len(df))
    return {"questions": questions, "target": target, "baseline": baseline, "raw": raw, "own": df, "sent": sent}


def own_valid(ae805) -> pd.DataFrame:
    """alpaca_eval's annotations with a preference (its parser's NaN and its failures left out, as here)."""
    df = ae805["own"]
    return df[df["preference"].notna()].copy()


def gamed_rows(n: int = 805) -> pd.DataFrame:
    """A synthetic df_gamed.csv: two gamed models judged on every row of the set, with the columns
    get_length_controlled_winrate reads (the real file's are the same kind)."""
    rows = []
    for model, bias in (("gamed_verbose", 1.0), ("gamed_concise", -1.0)):
        for i in range(n):
            sdl = math.sin(i * 0.7) * 2 + bias
            difficulty = math.cos(i * 0.3)
            p = 1 / (1 + math.exp(-(-1.2 * math.tanh(sdl) + 0.4 * difficulty)))
            rows.append({"model": model, "index": i, "preference": p, "std_delta_len": sdl,
                         "instruction_difficulty": difficulty, "not_gamed_baseline": False})
    return pd.DataFrame(rows)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding the dataset tatsu-lab/alpaca_eval's df_gamed.csv and instruction_difficulty.csv
    (synthetic), where alpaca_eval looks (``constants.DEFAULT_CACHE_DIR``), offline."""
    import alpaca_eval.constants
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "datasets--tatsu-lab--alpaca_eval"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    gamed = gamed_rows()
    gamed.to_csv(snap / "df_gamed.csv", index=False)
    gamed.drop_duplicates("index")[["index", "instruction_difficulty"]].to_csv(snap / "instruction_difficulty.csv",
                                                                               index=False)
    monkeypatch.setattr(alpaca_eval.constants, "DEFAULT_CACHE_DIR", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    import alpaca_eval.constants
    import huggingface_hub.constants

    (tmp_path / "empty-hf").mkdir()
    monkeypatch.setattr(alpaca_eval.constants, "DEFAULT_CACHE_DIR", str(tmp_path / "empty-hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def stages(tmp_path, questions, target, baseline):
    out = []
    for label, answers in (("target", target), ("baseline", baseline)):
        path = write_jsonl(tmp_path / label / "answers.jsonl",
                           [{"id": q["id"], "messages": q["messages"], "answer": answers[q["id"]]} for q in questions])
        out.append({"outputs": {"answers": str(path)}, "dir": str(path.parent), "label": label})
    return out


def judge_cfg(tmp_path, **judge) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"), "judge": {
        "protocol": "alpaca_eval", "backend": "openai", "model": JUDGE_MODEL, "api_base_env": "TEST_JUDGE_URL",
        "api_key_env": "TEST_JUDGE_KEY", "max_retries": 1, "retry_backoff_s": 0.001, **judge}})


def outputs_of(requests: list[dict]) -> list[dict]:
    """What the fake endpoint answers to ``requests``, without sending them."""
    outs = []
    for r in requests:
        top = judge_top(r["messages"])
        outs.append({"answer": top[0]["token"], "top_logprobs": top})
    return outs


# ------------------------------------------------------------------------------------------ the 805 rows


def test_the_805_rows_judged_end_to_end_equal_alpaca_evals_own(tmp_path, ae805, fake_endpoint, hub_cache):
    """The judge stage against the fake endpoint: every prompt it sends is byte for byte the one alpaca_eval sends
    (the same output order), every preference, the win rates and their standard error, and the length-controlled
    win rate equal alpaca_eval's own on the same judgements."""
    from alpaca_eval.metrics import get_length_controlled_winrate, get_winrate

    fake_endpoint.reply = endpoint_reply
    questions = ae805["questions"]
    done = pipeline.judge_stage(judge_cfg(tmp_path), *stages(tmp_path, questions, ae805["target"], ae805["baseline"]))
    m = done["metrics"]

    # What was sent: one request per prompt, 1 token, its top 5 log-probabilities; alpaca_eval's messages.
    bodies = [r["body"] for r in fake_endpoint]
    assert len(bodies) == 805
    assert {(b["model"], b["max_tokens"], b["logprobs"], b["top_logprobs"]) for b in bodies} == {(JUDGE_MODEL, 1,
                                                                                                   True, 5)}
    own_sent = ae805["sent"]
    assert {(s["max_tokens"], s["logprobs"], s["top_logprobs"], s["is_chat"]) for s in own_sent} == {(1, True, 5, True)}
    same = {json.dumps(r["messages"]) for r in ae.build_requests([questions[i] for i in SAME], ae805["target"],
                                                                  ae805["baseline"])}
    ours = sorted(json.dumps(b["messages"]) for b in bodies if json.dumps(b["messages"]) not in same)
    assert len(own_sent) == 803 and len(ours) == 803  # alpaca_eval asks nothing of two identical answers
    assert ours == sorted(json.dumps(s["messages"]) for s in own_sent)

    # Every preference, the unparsed ones included (None here, NaN there).
    verdicts = [json.loads(line) for line in open(done["outputs"]["verdicts"])]
    own = ae805["own"]
    for v, p in zip(verdicts, own["preference"], strict=True):
        assert (v["preference"] is None) == bool(pd.isna(p)), v["id"]
        if v["preference"] is not None:
            assert v["preference"] == pytest.approx(p, abs=1e-12)
    assert [verdicts[i]["preference"] for i in SAME] == [1.5, 1.5]
    assert any(v["switched"] for v in verdicts) and not all(v["switched"] for v in verdicts)

    # The counts and the rates: alpaca_eval's get_winrate over its own annotations.
    want = get_winrate(own)
    unparsed = int(own["preference"].isna().sum())
    assert unparsed > 0 and m["unparsed_judgements"] == unparsed and m["failed_judgements"] == 0
    assert (m["prompts"], m["valid"], m["invalid"]) == (805, 805 - unparsed, unparsed) == (805, want["n_total"],
                                                                                            unparsed)
    assert (m["win"], m["tie"], m["loss"]) == (want["n_wins"], want["n_draws"], want["n_wins_base"])
    assert m["alpaca_win_rate"] == pytest.approx(want["win_rate"], abs=1e-9)
    assert m["alpaca_standard_error"] == pytest.approx(want["standard_error"], abs=1e-9)
    assert m["discrete_win_rate"] == pytest.approx(want["discrete_win_rate"], abs=1e-9)
    assert m["win_rate"] == pytest.approx(want["win_rate"] / 100, abs=1e-12)
    valid = own_valid(ae805)
    assert m["avg_length"] == pytest.approx(valid["output_2"].str.len().mean())
    assert m["baseline_avg_length"] == pytest.approx(valid["output_1"].str.len().mean())

    # The length-controlled win rate: alpaca_eval's function on its own annotations, its rows' positions.
    lc = get_length_controlled_winrate(valid.copy(), save_weights_dir=None)
    assert m["lc_glm"] == "length_controlled_v1" and m["lc_win_rate_reason"] is None
    assert m["lc_win_rate"] == pytest.approx(lc["length_controlled_winrate"], abs=1e-9)
    assert m["lc_standard_error"] == pytest.approx(lc["lc_standard_error"], abs=1e-9)
    assert m["lc_win_rate_estimate"] is None
    assert abs(m["lc_win_rate"] - m["alpaca_win_rate"]) > 0.1  # the length bias is taken out
    assert all((v["glm_preference"] is None) == (v["preference"] is None) for v in verdicts)
    # Nothing of the GLM was written into the package, and the key reached no file of the stage.
    import alpaca_eval.metrics.glm_winrate as glm

    assert not list((glm.Path(glm.__file__).parent / "weights").glob("**/baseline_baseline.csv"))
    stored = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert fake_endpoint.key not in stored
    # The answers are kept with their log-probabilities: a re-run would send nothing.
    cache = endpoints.read_cache(next((tmp_path / "run" / "judgements").glob("*.jsonl")))
    assert len(cache) == 805 and all(c["top_logprobs"] for c in cache.values())


def test_without_the_hub_file_the_lc_win_rate_is_null_and_the_estimate_is_named_apart(ae805, empty_cache):
    """No df_gamed.csv (offline, not cached): lc_win_rate and its error are null with the reason; the estimate
    (GLM length_controlled_minimal, fitted by alpaca_eval's own functions) is lc_win_rate_estimate, and equals the
    package's functions applied by hand to alpaca_eval's own annotations."""
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    reqs = ae.build_requests(ae805["questions"], ae805["target"], ae805["baseline"])
    _, s = ae.score(reqs, outputs_of(reqs))
    assert s["lc_win_rate"] is None and s["lc_standard_error"] is None
    assert "df_gamed.csv" in s["lc_win_rate_reason"] and "tatsu-lab/alpaca_eval" in s["lc_win_rate_reason"]
    assert s["lc_glm"] == "length_controlled_minimal"

    valid = own_valid(ae805)
    delta = valid["output_1"].str.len() - valid["output_2"].str.len()
    train = pd.DataFrame({"preference": valid["preference"].astype(float) - 1, "std_delta_len": delta / delta.std(),
                          "not_gamed_baseline": True})
    test = train[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    info = GLM_INFO["length_controlled_minimal"]
    xy, x_test = make_dmatrix_for_model(train, test, formula=info["formula"])
    model = fit_LogisticRegressionCV(xy, "preference", is_ytrue_proba=True, **info["kwargs"])
    assert s["lc_win_rate_estimate"] == pytest.approx(model.predict_proba(x_test)[:, 1].mean() * 100, abs=1e-9)
    # Named apart everywhere: the summary, the report's column, the search metric.
    assert [k for k, v in s.items() if v == s["lc_win_rate_estimate"]] == ["lc_win_rate_estimate"]
    headings = dict(JUDGES["alpaca_eval"].columns)
    assert headings["lc_win_rate_estimate"] != headings["lc_win_rate"]
    assert "lc_win_rate_estimate" in JUDGES["alpaca_eval"].optional


def test_prompts_that_are_not_alpaca_eval_rows_get_the_estimate_and_the_reason(ae805, hub_cache):
    """With the hub file at hand: ids that are not AlpacaEval rows (another file, own ids) leave lc_win_rate out,
    saying why; a subset of the set (max_eval_prompts) keeps its rows' positions and gets alpaca_eval's number."""
    from alpaca_eval.metrics import get_length_controlled_winrate

    qs, t, b = ae805["questions"], ae805["target"], ae805["baseline"]
    reqs = ae.build_requests(qs, t, b)
    outs = outputs_of(reqs)
    for rename, words in ((lambda i: f"q{i}", "not AlpacaEval rows"), (lambda i: f"vicuna_test_set.jsonl:{i}",
                                                                        "not one AlpacaEval file")):
        renamed = [{**r, "id": rename(i), "qid": rename(i)} for i, r in enumerate(reqs)]
        _, s = ae.score(renamed, outs)
        assert s["lc_win_rate"] is None and words in s["lc_win_rate_reason"], s["lc_win_rate_reason"]
        assert isinstance(s["lc_win_rate_estimate"], float) and s["lc_glm"] == "length_controlled_minimal"
    _, s = ae.score(reqs[:200], outs[:200])
    first = own_valid(ae805)
    first = first[first["index"] < 200]
    lc = get_length_controlled_winrate(first.copy(), save_weights_dir=None)
    assert s["lc_win_rate"] == pytest.approx(lc["length_controlled_winrate"], abs=1e-9)
    assert s["lc_win_rate_estimate"] is None and s["lc_win_rate_reason"] is None


# ------------------------------------------------------------------------------------------ endpoints and cache


def test_an_endpoint_without_logprobs_is_a_clear_error(tmp_path, ae805, fake_endpoint):
    """An endpoint that ignores logprobs, or refuses them: an error naming the judge model and what it did with
    them, after a few requests (not every prompt counted as unparsed); the key is in no error. One that leaves them
    out of a few answers only: those are failed judgements."""
    qs = ae805["questions"][:40]
    args = stages(tmp_path, qs, ae805["target"], ae805["baseline"])
    fake_endpoint.reply = lambda body: chat_completion("M")
    with pytest.raises(GenerationError, match=rf"model '{JUDGE_MODEL}' without log-probabilities.*left them out") as e:
        pipeline.judge_stage(judge_cfg(tmp_path), *args)
    assert "top_logprobs: 5" in str(e.value) and fake_endpoint.key not in str(e.value)
    assert len(fake_endpoint) < 40  # it gave up after the first requests in a row failed

    fake_endpoint.clear()
    fake_endpoint.reply = lambda body: (400, {"error": {"message": "logprobs are not supported for this model"}})
    with pytest.raises(GenerationError, match="refused them.*not supported"):
        pipeline.judge_stage(judge_cfg(tmp_path, concurrency=2), *args)

    few = {json.dumps(r["messages"]) for r in ae.build_requests(qs[:3], ae805["target"], ae805["baseline"])}
    fake_endpoint.reply = lambda body: (chat_completion("M") if json.dumps(body["messages"]) in few
                                        else endpoint_reply(body))
    done = pipeline.judge_stage(judge_cfg(tmp_path, max_failed_fraction=0.1), *args)
    assert done["metrics"]["failed_judgements"] == 3 and done["counts"]["endpoint_requests"]["failed"] == {
        endpoints.NO_LOGPROBS: 3}


def test_logprob_requests_are_filed_apart_and_their_answers_kept(tmp_path, fake_endpoint):
    """A request that asks for log-probabilities has its own cache key, its answer keeps them across runs."""
    msgs = [{"role": "user", "content": "Which is better?"}]
    assert endpoints.request_key("m", msgs, 1) != endpoints.request_key("m", msgs, 1, top_logprobs=5)
    assert endpoints.request_key("m", msgs, 1) == endpoints.request_key("m", msgs, 1, top_logprobs=0)
    top = [{"token": "m", "logprob": -0.5}, {"token": "M", "logprob": -1.0}]
    fake_endpoint.reply = lambda body: chat_completion("m", top)
    ep = endpoints.Endpoint("TEST_JUDGE_URL", "TEST_JUDGE_KEY")
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]
    out = endpoints.complete_openai(prompts, "judge", ep, 1, top_logprobs=5)
    assert [o["top_logprobs"] for o in out] == [top] * 3 and not any(o["error"] for o in out)
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(endpoints.cache_line(o["key"], o["answer"], o["num_new_tokens"], o["top_logprobs"])
                            for o in out))
    again = endpoints.complete_openai(prompts, "judge", ep, 1, cache=endpoints.read_cache(path), top_logprobs=5)
    assert len(fake_endpoint) == 3 and all(o["cached"] for o in again)
    assert [o["top_logprobs"] for o in again] == [top] * 3
    plain = endpoints.complete_openai(prompts[:1], "judge", ep, 1)
    assert "top_logprobs" not in plain[0] and "logprobs" not in fake_endpoint[-1]["body"]


# ------------------------------------------------------------------------------------------ the local judge


def direct_top(model_dir, messages: list[dict], k: int) -> list[tuple[str, float]]:
    """The top-k of the first answer token by a plain transformers forward pass of one unpadded prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    values, idx = logp.topk(k)
    return [(tok.decode([i]), v) for v, i in zip(values.tolist(), idx.tolist(), strict=True)]


def test_the_local_judges_top_logprobs_equal_a_forward_pass(tiny_model):
    """The actor's batched, left-padded pass gives each prompt the top-k a forward pass of it alone gives."""
    import pyarrow as pa

    prompts = [{"id": f"p{i}", "messages": [{"role": "system", "content": "You judge."},
                                            {"role": "user", "content": "which model is better " * (1 + 4 * i)}]}
               for i in range(3)]
    actor = HFNextToken(str(tiny_model), top_k=5, threads=1, use_gpu=False)
    out = actor(pa.Table.from_pylist(prompts)).to_pylist()
    assert [o["id"] for o in out] == ["p0", "p1", "p2"]
    for p, o in zip(prompts, out, strict=True):
        want = direct_top(tiny_model, p["messages"], 5)
        assert [t["token"] for t in o["top_logprobs"]] == [t for t, _ in want]
        assert [t["logprob"] for t in o["top_logprobs"]] == pytest.approx([v for _, v in want], abs=1e-4)
        assert o["answer"] == want[0][0] and o["num_new_tokens"] == 1


def test_vllm_rows_give_the_first_tokens_top_logprobs():
    """ray.data.llm's output row (token ids as strings after Arrow, absent ids None, vLLM's extra sampled token)
    -> the k best of the first token, by vLLM's decoded text; no logprobs -> None (unparsed, never guessed)."""
    first = {"77": {"logprob": -0.1, "rank": 1, "decoded_token": "M"}, "109": {"logprob": -2.5, "rank": 2,
                                                                            "decoded_token": "m"},
             "5": {"logprob": -7.0, "rank": 3, "decoded_token": "Both"}, "6": None}
    row = {"id": "q1", "generated_text": "M", "num_generated_tokens": 1, "logprobs": [first, {"1": None}]}
    assert vllm_top_logprobs(row, 2) == {"id": "q1", "answer": "M", "num_new_tokens": 1, "top_logprobs": [
        {"token": "M", "logprob": -0.1}, {"token": "m", "logprob": -2.5}]}
    assert vllm_top_logprobs({**row, "logprobs": None}, 5)["top_logprobs"] is None
    assert vllm_top_logprobs({**row, "logprobs": [{"3": None}]}, 5)["top_logprobs"] is None


def test_the_local_judge_stage_asks_the_model_for_its_top_logprobs(tmp_path, questions805, monkeypatch):
    """judge.backend local: the stage asks next_token_logprobs for the annotator's top 5 with the judge's own
    generation settings, never generate; the verdicts are parsed from what it returns."""
    import importlib

    gen_module = importlib.import_module("alignment.evaluate.generate")  # the package's `generate` is the function
    asked = []

    def fake(model, prompts, top_k, g):
        asked.append((model, top_k, g))
        return [{"id": p["id"], "answer": "m", "num_new_tokens": 1,
                 "top_logprobs": [{"token": "m", "logprob": -0.1}, {"token": "M", "logprob": -2.4}]} for p in prompts]

    def no_generate(*a, **k):
        raise AssertionError("a judge that reads log-probabilities does not generate")

    monkeypatch.setattr(gen_module, "next_token_logprobs", fake)
    monkeypatch.setattr(pipeline, "generate", no_generate)
    qs = questions805[:6]
    answers = {"target": {q["id"]: f"target answer {i}" for i, q in enumerate(qs)},
               "baseline": {q["id"]: f"baseline {i}" for i, q in enumerate(qs)}}
    cfg = ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"), "judge": {
        "protocol": "alpaca_eval", "model": "org/judge", "generate": {"batch_size": 3, "num_actors": 2}}})
    done = pipeline.judge_stage(cfg, *stages(tmp_path, qs, answers["target"], answers["baseline"]))
    ((model, top_k, g),) = asked
    assert (model, top_k, g.batch_size, g.num_actors) == ("org/judge", 5, 3, 2)
    verdicts = [json.loads(line) for line in open(done["outputs"]["verdicts"])]
    m = done["metrics"]
    assert (m["prompts"], m["valid"], m["unparsed_judgements"]) == (6, 6, 0)
    # m is output_1, the baseline: preferred unless the order was switched for that instruction.
    assert [v["verdict"] for v in verdicts] == ["win" if v["switched"] else "loss" for v in verdicts]


def test_next_token_logprobs_through_ray_data(ray_local, tiny_model):
    """The transformers backend on Ray Data actors gives, in input order, what a forward pass of each prompt
    alone gives."""
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": "which answer is better " * (1 + 3 * i)}]}
               for i in range(3)]
    g = GenerateConfig(batch_size=2, num_actors=1, cpus_per_actor=1.0)
    out = next_token_logprobs(str(tiny_model), prompts, 5, g)
    assert [o["id"] for o in out] == ["p0", "p1", "p2"]
    for p, o in zip(prompts, out, strict=True):
        want = direct_top(tiny_model, p["messages"], 5)
        assert [t["token"] for t in o["top_logprobs"]] == [t for t, _ in want]
        assert [t["logprob"] for t in o["top_logprobs"]] == pytest.approx([v for _, v in want], abs=1e-4)
    with pytest.raises(GenerationError, match="not unique"):
        next_token_logprobs(str(tiny_model), prompts[:1] * 2, 5, g)
