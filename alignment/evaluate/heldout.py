"""Held-out preference accuracy and margin: metrics that need no judge.

For a pair (prompt x, chosen y_w, rejected y_l) the trained policy's implicit reward is DPO's, without its beta:
r(x, y) = log pi(y | x) - log ref(y | x), the reference being the weights preference tuning started from. The
pair's margin is r(x, y_w) - r(x, y_l); accuracy is the share of pairs with a positive margin (a zero margin is
not a success). Pairs are the preference stage's held-out rows (``pref.eval_rows``): the same seeded rows at every
point of a search, never trained on. The same formula serves every method, those without a reference model in
training (CPO, SimPO, ORPO) too, so that points with different methods compare on one scale.

Log-probabilities are summed over the answer's tokens as the trainers tokenise them: the prompt in the chat
template with the generation prompt, the answer as the rest of the templated conversation, cut at
``max_length`` (the training stage's); the rows that reach here were checked to keep an answer token.

A search scores the same held-out pairs with the same weights many times: model.base as the reference of every SFT
checkpoint alone, and each SFT checkpoint first as a preference run's reference and then alone. With a
``cache_dir`` each model's log-probabilities are kept there by the weights' fingerprint and the token ids, so
each is computed once per run, and a model whose log-probabilities are there is not loaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

# The summary's metrics, which search.metric may name; every key of the summary.
METRICS = ("pref_accuracy", "pref_margin")
KEYS = (*METRICS, "heldout_pairs", "heldout_unpaired", "heldout_reason")


def encode(tok: Any, prompt: list[dict], answer: str, max_length: int) -> tuple[list[int], int]:
    """The token ids of prompt + answer in the chat template (cut at ``max_length``) and where the answer starts."""
    prefix = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    return ids[:max_length], len(p_ids)


def answer_logps(model: Any, tok: Any, items: list[tuple[list[int], int]], batch_size: int = 8) -> np.ndarray:
    """Sum of log p(token | tokens before it) over each sequence's tokens from its answer start on."""
    import torch

    out = np.zeros(len(items), dtype=np.float64)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths together: less padding
    for s in range(0, len(items), batch_size):
        idx = order[s:s + batch_size]
        chunk = [items[i] for i in idx]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (seq, _) in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(model.device))[..., 0].cpu()
        for i, (seq, start) in enumerate(chunk):
            # Token t is predicted at position t - 1: the answer's tokens start..len-1.
            out[idx[i]] = float(logp[i, start - 1:len(seq) - 1].sum())
    return out


def pair_items(tok: Any, pairs: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """The sequences :func:`answer_logps` scores for ``pairs``: each pair's chosen, then its rejected."""
    return [encode(tok, p["prompt"], p[key], max_length) for p in pairs for key in ("chosen", "rejected")]


def pair_margins(policy_logps: np.ndarray, reference_logps: np.ndarray) -> np.ndarray:
    """Each pair's implicit-reward margin: (log pi(w) - log ref(w)) - (log pi(l) - log ref(l))."""
    diff = policy_logps - reference_logps
    return diff[0::2] - diff[1::2]


def margins(policy: Any, reference: Any, tok: Any, pairs: list[dict], max_length: int,
            batch_size: int = 8) -> np.ndarray:
    """:func:`pair_margins` of two loaded models."""
    items = pair_items(tok, pairs, max_length)
    return pair_margins(answer_logps(policy, tok, items, batch_size), answer_logps(reference, tok, items, batch_size))


def model_logps(path: str, tok: Any, items: list[tuple[list[int], int]], use_gpu: bool = False,
                cache_dir: str | None = None) -> np.ndarray:
    """:func:`answer_logps` of the model at ``path``, read from ``cache_dir`` where it was computed before (the same
    weights by fingerprint, the same token ids, the same device), else computed and kept there."""
    from ..manifest import digest, fingerprint

    file = None
    if cache_dir:
        file = Path(cache_dir) / f"{fingerprint(path)}-{digest([items, use_gpu])}.npy"
        if file.is_file():
            return np.load(file)
    from .. import models

    model, _ = models.load_for_generation(path, use_gpu)
    out = answer_logps(model, tok, items)
    if file:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # np.save on a name would add its own suffix
            np.save(f, out)
        os.replace(tmp, file)  # atomic: a concurrent reader sees the whole array or none
    return out


def summary(m: np.ndarray, unpaired: int = 0) -> dict[str, Any]:
    """Accuracy and mean margin over the pairs, or None with the reason where there is no pair."""
    out: dict[str, Any] = {"heldout_pairs": int(len(m)), "heldout_unpaired": unpaired}
    if not len(m):
        reason = ("no held-out pairs: set pref.eval_rows" if not unpaired else
                  f"the {unpaired} held-out rows are unpaired (prompt/completion/label): no pair to compare")
        return {**out, "pref_accuracy": None, "pref_margin": None, "heldout_reason": reason}
    if not np.isfinite(m).all():
        return {**out, "pref_accuracy": None, "pref_margin": None,
                "heldout_reason": f"{int((~np.isfinite(m)).sum())} of {len(m)} margins are not finite"}
    return {**out, "pref_accuracy": float((m > 0).mean()), "pref_margin": float(m.mean())}


def heldout(policy_path: str, reference_path: str, rows: list[dict], max_length: int,
            chat_template: str | None = None, use_gpu: bool = False, threads: int = 1,
            cache_dir: str | None = None) -> dict[str, Any]:
    """Held-out preference accuracy and margin of the model at ``policy_path`` against ``reference_path`` on the
    paired ``rows`` (``{prompt, chosen, rejected}``; unpaired rows are counted, not compared); one model in memory
    at a time, each model's log-probabilities kept in ``cache_dir`` (:func:`model_logps`)."""
    import torch

    from .. import models

    pairs = [r for r in rows if "chosen" in r]
    if not pairs:
        return summary(np.zeros(0), len(rows))
    torch.set_num_threads(max(1, math.ceil(threads)))
    tok = models.tokenizer(policy_path, chat_template)
    items = pair_items(tok, pairs, max_length)
    logps = [model_logps(path, tok, items, use_gpu, cache_dir) for path in (policy_path, reference_path)]
    return summary(pair_margins(*logps), len(rows) - len(pairs))
