"""The model registry: SmolLM2 from its GGUF file, name resolution, the training chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment import models


@pytest.fixture(scope="module")
def smollm2():
    return models.prepare("smollm2-135m-instruct")


@pytest.mark.slow
def test_prepared_smollm2_is_a_plain_checkpoint_with_the_gguf_weights(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert getattr(model.config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(smollm2)
    d, gguf = models._smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    # prepared once: a second call reuses the directory
    before = (smollm2 / "model.safetensors").stat().st_mtime
    assert models.prepare("smollm2-135m-instruct") == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime == before


@pytest.mark.slow
def test_training_template_renders_like_smollm2s_own_and_masks_only_answers(smollm2):
    tok = models.load_tokenizer(str(smollm2))
    template = models.training_chat_template(tok)
    assert template == models.SMOLLM2_TRAINING_CHAT_TEMPLATE
    for conv in (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
         {"role": "assistant", "content": "d"}],
    ):
        assert tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(
            conv, tokenize=False, chat_template=template)
        out = tok.apply_chat_template(conv, chat_template=template, return_assistant_tokens_mask=True, return_dict=True)
        masked = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert masked == "<|im_end|>".join(answers) + "<|im_end|>"


def test_resolve_paths_ids_and_errors(tmp_path, tiny_model):
    assert models.resolve(str(tiny_model)) == str(tiny_model.resolve())
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(models.ModelError, match="not a model directory"):
        models.resolve(str(tmp_path))
    with pytest.raises(models.ModelError, match="model path not found"):
        models.resolve("./no/such/model")
    with pytest.raises(models.ModelError, match="unknown model name"):
        models.prepare("gpt-5")


def test_a_template_without_generation_markers_is_a_clear_error(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(models.ModelError, match="model.chat_template"):
        models.training_chat_template(tok)


def test_vllm_gets_a_cloud_checkpoint_as_its_uri_and_anything_else_local(tiny_model, s3_storage, tmp_path,
                                                                          monkeypatch):
    """ray.data.llm downloads an s3:// model on each GPU node itself, so a full model's URI is passed on as it
    is; a URI with pyarrow's options (which ray.data.llm does not take) is downloaded here, once."""
    import pyarrow.fs as pafs

    uri, fs = s3_storage
    monkeypatch.setenv("ALIGNMENT_CACHE", str(tmp_path / "cache"))
    bucket_dir, options = uri.split("?", 1)
    pafs.copy_files(str(tiny_model), bucket_dir.removeprefix("s3://") + "/engine/model", destination_filesystem=fs)
    with_options = f"{bucket_dir}/engine/model?{options}"
    local = models.engine_source(with_options)
    assert local.startswith(str(tmp_path / "cache" / "remote")) and (tmp_path / "cache" / "remote").is_dir()
    assert sorted(p.name for p in (Path(local)).iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    # Without options, the endpoint comes from the environment, as on a cluster's nodes.
    host = dict(kv.split("=") for kv in options.split("&"))["endpoint_override"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert models.engine_source(f"{bucket_dir}/engine/model") == f"{bucket_dir}/engine/model"
    assert models.engine_source(str(tiny_model)) == str(tiny_model)
