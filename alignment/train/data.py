"""The training rows: seeded nested splits, the rows that can train (set aside with a reason otherwise), and the
rows as each method's TRL trainer takes them."""

from __future__ import annotations

import hashlib
from typing import Any

from .. import methods
from .errors import TrainError


def method_spec(name: str) -> methods.Method:
    """The methods table's entry of ``name`` ('sft' or a preference method)."""
    try:
        return methods.method(name)
    except KeyError:
        raise TrainError(f"unknown method {name!r}") from None


def seeded_order(rows: list[dict], seed: int) -> list[dict]:
    """Rows in an order fixed by the seed and each row's id (not by the input's order)."""
    def key(r: dict) -> str:
        return hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest()

    return sorted(rows, key=key)


def split_rows(rows: list[dict], seed: int, eval_rows: int, num_rows: int | None) -> tuple[list[dict], list[dict]]:
    """(train, eval): ``eval_rows`` held out, then the first ``num_rows`` of the rest, both in the seeded order.

    The same seed gives nested subsets: the rows of a smaller ``num_rows`` are among those of a larger one,
    and the held-out rows are the same whatever ``num_rows`` is.
    """
    ordered = seeded_order(rows, seed)
    if eval_rows >= len(ordered):
        raise TrainError(f"eval_rows={eval_rows} leaves no training rows out of {len(ordered)}")
    held, rest = ordered[:eval_rows], ordered[eval_rows:]
    if num_rows is not None:
        if num_rows > len(rest):
            raise TrainError(f"num_pairs={num_rows} but only {len(rest)} rows are left after {eval_rows} eval rows")
        rest = rest[:num_rows]
    return rest, held


def _answers(row: dict) -> tuple[str, ...]:
    return ("completion",) if "completion" in row else ("chosen", "rejected")


def _set_aside(row: dict, field: str, why: str) -> dict:
    return {**{k: row[k] for k in ("id", "source", "row") if k in row}, "field": field, "error": why}


def trainable_rows(method: str, rows: list[dict], tok: Any, max_length: int) -> tuple[list[dict], list[dict]]:
    """(rows that can train, a set-aside record per row that cannot, with its field and reason).

    A row cannot train when no completion token is left within ``max_length`` (the prompt, in the chat template,
    fills it: TRL's DPO and KTO then drop the row silently, its CPO, SimPO and ORPO average over zero tokens and
    turn the weights NaN), when an answer is empty, or when chosen and rejected are the same answer. Token counts
    follow the trainers: the prompt templated with the generation prompt, the completion as the rest of
    prompt + answer; a trainer that adds a BOS token (``adds_bos``: CPO, SimPO, ORPO) adds it where the prompt
    lacks one. sft rows: the prompt is everything before the first assistant turn.
    """
    aside: list[dict] = []
    candidates: list[dict] = []
    for r in rows:
        if method != "sft":
            empty = next((a for a in _answers(r) if not str(r[a]).strip()), None)
            if empty:
                aside.append(_set_aside(r, empty, "empty answer"))
                continue
            if "chosen" in r and r["chosen"].strip() == r["rejected"].strip():
                aside.append(_set_aside(r, "rejected", "the same answer as chosen: the pair states no preference"))
                continue
        candidates.append(r)

    def render(messages: list[dict], generation: bool = False) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    prefixes, fulls = [], []
    for r in candidates:
        if method == "sft":
            first = next(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
            prompt, answers = r["messages"][:first], [r["messages"][first]]
        else:
            prompt, answers = r["prompt"], [{"role": "assistant", "content": r[a]} for a in _answers(r)]
        prefixes.append(render(prompt, generation=True))
        fulls.append([render(prompt + [a]) for a in answers])
    flat = [t for texts in fulls for t in texts]
    ids = tok(prefixes + flat, add_special_tokens=False)["input_ids"] if candidates else []
    prefix_ids, full_lens = ids[:len(prefixes)], iter(len(x) for x in ids[len(prefixes):])
    bos = tok.bos_token_id if method_spec(method).adds_bos else None
    kept = []
    for r, p, texts in zip(candidates, prefix_ids, fulls):
        prompt_len = len(p) + (1 if bos is not None and (not p or p[0] != bos) else 0)
        completion = min(next(full_lens) - len(p) for _ in texts)
        if prompt_len >= max_length or completion < 1:
            what = "the prompt is" if method != "sft" else "the turns before the first answer are"
            aside.append(_set_aside(r, "messages" if method == "sft" else "prompt",
                                    f"no completion token within max_length={max_length}: {what} {prompt_len} "
                                    f"tokens in the chat template, the answer {max(completion, 0)}"))
        else:
            kept.append(r)
    return kept, aside


def check_batch(rows: int, settings: dict[str, Any], num_workers: int, method: str) -> None:
    """Too few rows (as the trainer takes them: KTO's pairs are two rows each) for one optimizer step of every
    worker is an error before any worker starts."""
    need = settings["per_device_batch_size"] * settings["gradient_accumulation_steps"] * num_workers
    if rows < need:
        raise TrainError(f"{method}: {rows} training rows left, fewer than one optimizer step takes ({need} = "
                         f"per_device_batch_size {settings['per_device_batch_size']} x gradient_accumulation_steps "
                         f"{settings['gradient_accumulation_steps']} x {num_workers} workers); add data, lower "
                         "eval_rows or the batch size, or raise max_length")


def method_dataset(rows: list[dict], method: str) -> list[dict]:
    """The rows as the method's TRL trainer takes them (conversational: lists of messages).

    sft: ``{messages}``; paired methods: ``{prompt, chosen, rejected}``; kto: ``{prompt, completion, label}``,
    where each pair gives a desirable (chosen) and an undesirable (rejected) row.
    """
    def answer(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    if method == "sft":
        return [{"messages": r["messages"]} for r in rows]
    unpaired = [r for r in rows if "completion" in r]
    if not method_spec(method).paired:
        out = []
        for r in rows:
            if "completion" in r:
                out.append({"prompt": r["prompt"], "completion": answer(r["completion"]), "label": r["label"]})
            else:
                out.append({"prompt": r["prompt"], "completion": answer(r["chosen"]), "label": True})
                out.append({"prompt": r["prompt"], "completion": answer(r["rejected"]), "label": False})
        return out
    if unpaired:
        takers = ", ".join(n for n, m in methods.METHODS.items() if not m.paired)
        raise TrainError(f"method {method} trains on pairs, but {len(unpaired)} rows are unpaired "
                         f"(prompt/completion/label, first {unpaired[0]['id']}); only {takers} takes unpaired rows")
    return [{"prompt": r["prompt"], "chosen": answer(r["chosen"]), "rejected": answer(r["rejected"])} for r in rows]
