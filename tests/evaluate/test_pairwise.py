"""The Vicuna/Long-Is-More pairwise judge: parsing and aggregation rules."""

from __future__ import annotations

import pytest

from alignment.evaluate import pairwise as judge


@pytest.mark.parametrize("text,expected", [
    ("8 7\nAssistant 1 is better.", (8.0, 7.0)),
    ("  9, 3", (9.0, 3.0)),
    ("Scores: 8/10 6/10", (8.0, 6.0)),
    ("\n10 9.5\n", (10.0, 9.5)),
    ("**7 7**", (7.0, 7.0)),
    ("Assistant 1 is better", None),
    ("8\n7", None),
    ("11 3", None),
    ("", None),
])
def test_parse_scores(text, expected):
    assert judge.parse_scores(text) == expected


@pytest.mark.parametrize("o1,o2,strict,summed", [
    (1, 1, "win", "win"), (-1, -1, "loss", "loss"), (1, -1, "tie", "tie"),
    (1, 0, "tie", "win"), (0, -1, "tie", "loss"), (0, 0, "tie", "tie"),
])
def test_strict_and_sum_rules(o1, o2, strict, summed):
    assert judge.combine(o1, o2, "strict") == strict
    assert judge.combine(o1, o2, "sum") == summed


def test_score_swaps_orders_and_counts_unparsed_as_invalid():
    questions = [{"id": q, "messages": [{"role": "user", "content": f"question {q}"}]} for q in "abcd"]
    reqs = judge.build_requests(questions, {q: f"T{q}" for q in "abcd"}, {q: f"B{q}" for q in "abcd"})
    assert [r["order"] for r in reqs[:2]] == [1, 2]
    assert "Tb" not in reqs[0]["messages"][-1]["content"] and "Ta" in reqs[0]["messages"][-1]["content"]
    first = reqs[1]["messages"][-1]["content"]
    assert first.index("Ba") < first.index("Ta")  # order 2: the target's answer is Assistant 2
    outs = [
        {"answer": "8 5"}, {"answer": "5 8"},  # a: target wins both orders
        {"answer": "8 5"}, {"answer": "8 5"},  # b: position bias -> orders disagree
        {"answer": "7 7"}, {"answer": "I think"},  # c: second order unparsed -> invalid
        {"answer": "3 9"}, {"answer": "9 3"},  # d: target loses both
    ]
    verdicts, s = judge.score(reqs, outs, "strict")
    assert [v["verdict"] for v in verdicts] == ["win", "tie", "invalid", "loss"]
    assert (s["win"], s["tie"], s["loss"], s["invalid"], s["valid"]) == (1, 1, 1, 1, 3)
    assert s["unparsed_judgements"] == 1 and s["win_rate"] == pytest.approx(1 / 3)
    assert s["order_disagreement_rate"] == pytest.approx(1 / 3) and s["rule"] == "strict"
    # sum: (+1, -1) is still a tie, the others as before
    assert [v["verdict"] for v in judge.score(reqs, outs, "sum")[0]] == ["win", "tie", "invalid", "loss"]


def test_an_endpoint_error_is_never_guessed():
    questions = [{"id": "a", "messages": [{"role": "user", "content": "q"}]}]
    reqs = judge.build_requests(questions, {"a": "t"}, {"a": "b"})
    outs = [{"answer": "", "error": "URLError: refused"}, {"answer": "5 8"}]
    verdicts, s = judge.score(reqs, outs, "sum")
    assert verdicts[0]["verdict"] == "invalid" and verdicts[0]["error"] == "URLError: refused"
    assert s["win_rate"] is None and s["valid"] == 0


def test_the_verbosity_check_asks_again_with_a_length_penalty_and_reports_agreement():
    qs = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(5)]
    target = {q["id"]: "long " * 50 for q in qs}
    base = {q["id"]: "short" for q in qs}
    reqs = judge.build_requests(qs, target, base, verbosity_check=True)
    plain = [r for r in reqs if "variant" not in r]
    penal = [r for r in reqs if r.get("variant") == "length_penalty"]
    assert len(plain) == len(penal) == 10 and len({r["id"] for r in reqs}) == 20
    assert plain == judge.build_requests(qs, target, base)  # the plain judge's requests are unchanged
    for p, lp in zip(plain, penal, strict=True):
        text, penalised = p["messages"][-1]["content"], lp["messages"][-1]["content"]
        assert judge.LENGTH_PENALTY not in text and penalised.replace(judge.LENGTH_PENALTY + "\n", "") == text
        assert penalised.endswith(text[text.index("Please first output"):])  # the format instruction stays last
    # Plain judge: the long target wins all five. Length penalty: it loses q0 and q1, q2's penalised judgements are
    # unparsed (left out of the agreement), q3 and q4 agree.
    def out(r):
        if r.get("variant") and r["qid"] == "q2":
            return {"answer": "no scores"}
        target_first = r["order"] == 1
        wins = not (r.get("variant") and r["qid"] in ("q0", "q1"))
        return {"answer": "9 2" if wins == target_first else "2 9"}

    verdicts, s = judge.score(reqs, [out(r) for r in reqs], "strict")
    assert [v["verdict"] for v in verdicts] == ["win"] * 5
    assert [v["verdict_length_penalty"] for v in verdicts] == ["loss", "loss", "invalid", "win", "win"]
    assert s["win_rate"] == 1.0 and s["length_penalty_win_rate"] == 0.5
    assert s["verbosity_compared"] == 4 and s["verbosity_agreement"] == 0.5
    assert s["judgements"] == 20 and s["unparsed_judgements"] == 2 and s["valid"] == 5 and s["verbosity_check"]
    _, off = judge.score(plain, [out(r) for r in plain], "strict")
    assert off["verbosity_agreement"] is None and off["verbosity_compared"] == 0 and not off["verbosity_check"]


def test_the_verbosity_check_is_vicuna_pairwises_only():
    from alignment.config import ConfigError, load_config

    assert load_config(None, ["judge.verbosity_check=true"]).judge.verbosity_check
    with pytest.raises(ConfigError, match="judge.verbosity_check is vicuna_pairwise's, not mt_bench's"):
        load_config(None, ["judge.verbosity_check=true", "judge.protocol=mt_bench", "judge.prompts=x.jsonl"])
