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
"""

from __future__ import annotations

import math
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


def margins(policy: Any, reference: Any, tok: Any, pairs: list[dict], max_length: int,
            batch_size: int = 8) -> np.ndarray:
    """Each pair's implicit-reward margin: (log pi(w) - log ref(w)) - (log pi(l) - log ref(l))."""
    items = [encode(tok, p["prompt"], p[key], max_length) for p in pairs for key in ("chosen", "rejected")]
    diff = answer_logps(policy, tok, items, batch_size) - answer_logps(reference, tok, items, batch_size)
    return diff[0::2] - diff[1::2]


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
            chat_template: str | None = None, use_gpu: bool = False, threads: int = 1) -> dict[str, Any]:
    """Held-out preference accuracy and margin of the model at ``policy_path`` against ``reference_path`` on the
    paired ``rows`` (``{prompt, chosen, rejected}``; unpaired rows are counted, not compared)."""
    import torch

    from .. import models

    pairs = [r for r in rows if "chosen" in r]
    if not pairs:
        return summary(np.zeros(0), len(rows))
    torch.set_num_threads(max(1, math.ceil(threads)))
    tok = models.tokenizer(policy_path, chat_template)
    policy, _ = models.load_for_generation(policy_path, use_gpu)
    reference, _ = models.load_for_generation(reference_path, use_gpu)
    return summary(margins(policy, reference, tok, pairs, max_length), len(rows) - len(pairs))
