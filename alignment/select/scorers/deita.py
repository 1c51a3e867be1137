"""The ``deita`` scorer: Deita's complexity and quality scorers exactly as published (Liu et al. 2024, "What
Makes Good Data for Alignment? A Comprehensive Study of Automatic Data Selection in Instruction Tuning").

The score is the expected value of the next-token distribution restricted to the tokens "1".."6", whose ids are
looked up from the scorer's tokenizer; per turn, complexity scores the user turn and quality the (user,
assistant) pair; the evol score is ``sum_t c_t * q_t``. The fast path runs one forward pass per batch (right
padding, the last real token's hidden state, the output head restricted to the six rows);
:func:`reference_expected_score` is the paper's code's way (a two-token ``generate`` per prompt), kept for parity
tests and benchmark (c). A row that cannot be scored gets a null score and a reason, never a default: the
paper's code returns 3.0 on any failure, which silently corrupts rankings. :class:`DeitaScorer` is the Ray Data
actor (transformers); ``deita_vllm`` the vLLM backend.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ...ray_env import actor_pool, actor_threads
from ..rows import ScorerError, merge_errors, scatter, valid

if TYPE_CHECKING:
    from ...config import DeitaConfig, SelectConfig
    from . import Context

COMPLEXITY_PROMPT = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {instruction}  \n##Complexity: "
)
QUALITY_PROMPT = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
SCORE_TOKENS = ("1", "2", "3", "4", "5", "6")


def deita_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(instruction, response) per turn; system turns skipped; a trailing user turn gets an empty response."""
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "user":
            if pending is not None:
                raise ValueError("two user turns in a row")
            pending = m["content"]
        elif m["role"] == "assistant":
            if pending is None:
                raise ValueError("an assistant turn without a user turn before it")
            turns.append((pending, m["content"]))
            pending = None
        else:
            raise ValueError(f"unknown role {m['role']!r}")
    if pending is not None:
        turns.append((pending, ""))
    if not turns:
        raise ValueError("no user turn")
    return turns


def complexity_prompt(instruction: str) -> str:
    return COMPLEXITY_PROMPT.format(instruction=instruction)


def quality_prompt(instruction: str, output: str) -> str:
    return QUALITY_PROMPT.format(instruction=instruction, output=output)


def score_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the tokens "1".."6" in this tokenizer (each must be a single token)."""
    ids = []
    for d in SCORE_TOKENS:
        enc = tokenizer.encode(d, add_special_tokens=False)
        # SentencePiece tokenizers may prefix a word-boundary piece ("▁", "1"): the digit is the last piece.
        tid = tokenizer.convert_tokens_to_ids(d)
        if tid is None or tid == tokenizer.unk_token_id:
            tid = enc[-1] if enc else None
        if tid is None or tokenizer.decode([tid]).strip() != d:
            raise ScorerError(f"the scorer's tokenizer has no single token for {d!r} (encodes as {enc})")
        ids.append(int(tid))
    if len(set(ids)) != 6:
        raise ScorerError(f"the score tokens '1'..'6' do not have six distinct ids: {ids}")
    return ids


def expected_scores(logits: np.ndarray) -> np.ndarray:
    """``sum_i i * softmax(logits)_i`` per row of an ``[n, 6]`` array of the six score tokens' logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ np.arange(1, 7, dtype=np.float64)


def evol_score(complexity: Sequence[float | None], quality: Sequence[float | None]) -> float | None:
    """Deita's evol score ``sum_t c_t * q_t``; null if any turn is unscored."""
    if any(c is None for c in complexity) or any(q is None for q in quality) or len(complexity) != len(quality):
        return None
    return float(sum(c * q for c, q in zip(complexity, quality)))


CPU_BATCH_TOKENS = 2048


class CausalLMScorer:
    """A causal LM that scores prompts by the expected value over its "1".."6" tokens, batched.

    One forward pass per batch of prompts sorted by length (less padding), right-padded so that every real
    token sees exactly the tokens it would see alone; the output head is applied to the last real token's
    hidden state only, restricted to the six score tokens' rows.
    """

    def __init__(self, model_path: str, max_length: int, batch_size: int, device: str = "cpu",
                 dtype: str = "auto", min_shared_prefix: int = 8, batch_tokens: int | None = None):
        """``batch_tokens``: padded tokens per forward pass at most (beyond a shared prefix); None: 2,048 on
        CPU, where a batch of long prompts ran slower than the same prompts one by one (benchmark (c)), and
        no limit on GPU; 0: no limit."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ... import models

        path = models.materialize(model_path)
        self.tok = AutoTokenizer.from_pretrained(path)
        torch_dtype = {"auto": torch.bfloat16 if device != "cpu" else torch.float32, "float32": torch.float32,
                       "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if device != "cpu":
            models.varying_length_attention()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        self.ids = score_token_ids(self.tok)
        head = self.model.get_output_embeddings()
        self.head_w = head.weight[self.ids].detach().float()
        self.head_b = head.bias[self.ids].detach().float() if getattr(head, "bias", None) is not None else None
        self.body = self.model.base_model
        self.max_length = max_length
        self.batch_size = batch_size
        self.batch_tokens = (CPU_BATCH_TOKENS if device == "cpu" else 0) if batch_tokens is None else batch_tokens
        self.min_shared_prefix = min_shared_prefix
        # transformers 5.2x renamed the forward's past_key_values to cache
        self.cache_arg = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        self.device = device
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def encode(self, prompt: str) -> list[int]:
        # As the reference: tokenizer.encode(prompt), the tokenizer's own special tokens included.
        return self.tok(prompt)["input_ids"]

    def score_logits(self, prompts: Sequence[str]) -> tuple[list[np.ndarray | None], list[str | None]]:
        """The six score tokens' next-token logits per prompt, or None and a reason.

        Prompts of one kind share long prefixes (the scorer's template, and often a dataset's own prompt
        wrapper): prompts are grouped by shared prefix, and each group's prefix keys and values are computed
        once and reused by all its batches. That is exact (each token still attends to the same tokens at the
        same positions) and saves a large share of the work.
        """
        encoded = [self.encode(p) for p in prompts]
        logits: list[np.ndarray | None] = [None] * len(prompts)
        reasons: list[str | None] = [None] * len(prompts)
        todo = []
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                reasons[i] = f"prompt of {len(ids)} tokens > max_length {self.max_length}"
            elif not ids:
                reasons[i] = "empty prompt"
            else:
                todo.append(i)
        for group in _prefix_groups(todo, encoded, self.min_shared_prefix) if todo else []:
            self._score_group(group, encoded, logits, reasons)
        return logits, reasons

    def _score_group(self, group: list[int], encoded: list[list[int]], logits: list, reasons: list) -> None:
        import torch

        group = sorted(group, key=lambda i: -len(encoded[i]))  # similar lengths together: less padding
        shared = min(_common_prefix([encoded[i] for i in group]), len(encoded[group[-1]]) - 1)
        prefix_cache = None
        if shared >= self.min_shared_prefix and len(group) > 1:
            with torch.inference_mode():
                out = self.body(input_ids=torch.tensor([encoded[group[0]][:shared]], device=self.device),
                                use_cache=True)
                prefix_cache = out["cache"] if "cache" in out else out["past_key_values"]
        else:
            shared = 0
        for chunk in self._chunks(group, encoded, shared):
            width = len(encoded[chunk[0]]) - shared
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for r, i in enumerate(chunk):
                n = len(encoded[i]) - shared
                input_ids[r, :n] = torch.tensor(encoded[i][shared:])
                mask[r, shared:shared + n] = 1
            kwargs = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(chunk))
                positions = torch.arange(shared, shared + width, device=self.device).expand(len(chunk), -1)
                kwargs = {self.cache_arg: cache, "use_cache": True, "position_ids": positions}
            with torch.inference_mode():
                hidden = self.body(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                   **kwargs).last_hidden_state
                last = hidden[torch.arange(len(chunk)), mask.sum(dim=1).to(self.device) - 1 - shared]
                out = last.float() @ self.head_w.T
                if self.head_b is not None:
                    out = out + self.head_b
            out = out.cpu().numpy()
            for r, i in enumerate(chunk):
                if not np.all(np.isfinite(out[r])):
                    reasons[i] = "non-finite logits"
                else:
                    logits[i] = out[r]

    def _chunks(self, group: list[int], encoded: list[list[int]], shared: int) -> Iterator[list[int]]:
        """Batches of a group sorted longest first: at most ``batch_size`` prompts and, when set, at most
        ``batch_tokens`` padded tokens (beyond the shared prefix); a prompt alone may be longer."""
        start = 0
        while start < len(group):
            width = len(encoded[group[start]]) - shared
            n = self.batch_size
            if self.batch_tokens:
                n = max(1, min(n, self.batch_tokens // max(width, 1)))
            yield group[start:start + n]
            start += n

    def score(self, prompts: Sequence[str]) -> tuple[list[float | None], list[str | None]]:
        logits, reasons = self.score_logits(prompts)
        ok = [i for i, x in enumerate(logits) if x is not None]
        scores: list[float | None] = [None] * len(prompts)
        if ok:
            values = expected_scores(np.stack([logits[i] for i in ok]))
            for i, v in zip(ok, values):
                scores[i] = float(v)
        return scores, reasons


def _prefix_groups(todo: list[int], encoded: list[list[int]], min_gain: int, min_size: int = 4) -> list[list[int]]:
    """Prompts grouped by long shared prefixes: sorted by token ids, consecutive prompts stay together while
    they share ``min_gain`` tokens more than all prompts do; groups under ``min_size`` prompts go back to the rest."""
    if len(todo) < 2 * min_size:
        return [todo]
    order = sorted(todo, key=lambda i: encoded[i])
    base = _common_prefix([encoded[i] for i in order])
    groups, cur, cur_shared = [], [order[0]], len(encoded[order[0]])
    for prev, i in zip(order, order[1:]):
        shared = min(cur_shared, _common_prefix([encoded[prev], encoded[i]]))
        if shared >= base + min_gain:
            cur.append(i)
            cur_shared = shared
        else:
            groups.append(cur)
            cur, cur_shared = [i], len(encoded[i])
    groups.append(cur)
    big = [g for g in groups if len(g) >= min_size]
    rest = [i for g in groups if len(g) < min_size for i in g]
    return big + ([rest] if rest else [])


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        m = min(n, len(s))
        k = 0
        while k < m and s[k] == first[k]:
            k += 1
        n = k
    return n


def reference_expected_score(model: Any, tokenizer: Any, prompt: str, ids: Sequence[int]) -> float:
    """Deita's reference way, one prompt at a time: a two-token greedy ``generate``, the first step's scores."""
    import torch

    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=2,
                             num_return_sequences=1, return_dict_in_generate=True, output_scores=True,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    first = out.scores[0][0]
    return float(expected_scores(first[list(ids)].float().cpu().numpy()[None])[0])


def deita_prompts(messages: list[dict]) -> tuple[list[str], list[str]]:
    turns = deita_turns(messages)
    return [complexity_prompt(q) for q, _ in turns], [quality_prompt(q, a) for q, a in turns]


def deita_scores(conversations: Sequence[list[dict]], complexity: CausalLMScorer, quality: CausalLMScorer
                 ) -> list[dict[str, Any]]:
    """Per conversation: ``deita_complexity`` and ``deita_quality`` (per-turn lists), ``score_deita_evol``,
    and ``error`` (None, or why a turn could not be scored)."""
    plans: list[tuple[list[str], list[str]] | str] = []
    for m in conversations:
        try:
            plans.append(deita_prompts(m))
        except ValueError as e:
            plans.append(f"deita: {e}")
    cp = [p for plan in plans if not isinstance(plan, str) for p in plan[0]]
    qp = [p for plan in plans if not isinstance(plan, str) for p in plan[1]]
    cs, cr = complexity.score(cp)
    qs, qr = quality.score(qp)
    out, i = [], 0
    for plan in plans:
        if isinstance(plan, str):
            out.append({"deita_complexity": None, "deita_quality": None, "score_deita_evol": None, "error": plan})
            continue
        n = len(plan[0])
        c, q = cs[i:i + n], qs[i:i + n]
        why = [f"deita complexity, turn {t + 1}: {r}" for t, r in enumerate(cr[i:i + n]) if r]
        why += [f"deita quality, turn {t + 1}: {r}" for t, r in enumerate(qr[i:i + n]) if r]
        out.append({"deita_complexity": c, "deita_quality": q, "score_deita_evol": evol_score(c, q),
                    "error": "; ".join(why) or None})
        i += n
    return out


def expected_score_from_logprobs(top: dict[Any, Any] | None, ids: Sequence[int]) -> tuple[float | None, str | None]:
    """The expected score from one generated position's top logprobs (vLLM: ``{token_id: {"logprob": ...}}``,
    keys may be strings after Arrow); a missing score token is a failure, not a guess."""
    if not top:
        return None, "no logprobs returned"
    by_id = {int(k): (v["logprob"] if isinstance(v, dict) else float(v)) for k, v in top.items() if v is not None}
    missing = [SCORE_TOKENS[j] for j, t in enumerate(ids) if t not in by_id]
    if missing:
        return None, f"score tokens {missing} not among the {len(by_id)} returned logprobs (raise logprobs)"
    return float(expected_scores(np.array([[by_id[t] for t in ids]]))[0]), None


SCORE_LIST = pa.list_(pa.float64())


class DeitaScorer:
    """Ray Data actor: Deita's complexity and quality scorers (transformers), one forward pass per batch."""

    def __init__(self, d: DeitaConfig, complexity_model: str, quality_model: str):
        import torch

        torch.set_num_threads(actor_threads(d))
        device = "cuda" if d.gpus_per_actor > 0 else "cpu"
        self.complexity = CausalLMScorer(complexity_model, d.max_length, d.batch_size, device, d.dtype,
                                         batch_tokens=d.batch_tokens)
        self.quality = (self.complexity if quality_model == complexity_model else
                        CausalLMScorer(quality_model, d.max_length, d.batch_size, device, d.dtype,
                                       batch_tokens=d.batch_tokens))

    def __call__(self, table: pa.Table) -> pa.Table:
        ok = valid(table)
        msgs = [m for m, good in zip(table["messages"].to_pylist(), ok) if good]
        res = scatter(deita_scores(msgs, self.complexity, self.quality), ok, {})
        return merge_errors(
            table.append_column("deita_complexity", pa.array([r.get("deita_complexity") for r in res], SCORE_LIST))
            .append_column("deita_quality", pa.array([r.get("deita_quality") for r in res], SCORE_LIST))
            .append_column("score_deita_evol", pa.array([r.get("score_deita_evol") for r in res], pa.float64())),
            [r.get("error") for r in res],
        )


def models(s: SelectConfig) -> dict[str, str]:
    return {"complexity_model": "select.deita.complexity_model", "quality_model": "select.deita.quality_model"}


def add(ds: Any, s: SelectConfig, ctx: Context) -> Any:
    """Actors holding the two models (transformers), or two ``ray.data.llm`` passes (vllm)."""
    d, r = s.deita, ctx.resolved
    if d.backend == "vllm":
        from . import deita_vllm

        return deita_vllm.add_deita_vllm(ds, d, r.complexity_model, r.quality_model, list(ctx.columns))
    return ds.map_batches(
        DeitaScorer, fn_constructor_kwargs={"d": d, "complexity_model": r.complexity_model,
                                            "quality_model": r.quality_model},
        batch_size=max(256, d.batch_size), batch_format="pyarrow", **actor_pool(d))
