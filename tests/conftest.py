"""Shared fixtures: one local Ray for the whole session, a tiny random Llama, paths to ../shared/data."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples" / "data"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The S3 test's endpoint is moto's server on the loopback (s3_storage); every process that reaches it, Ray's
# workers included, takes these dummy credentials from the environment they inherit, so no AWS client here ever
# looks for others (the instance-metadata service is off).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

WORDS = ("the a model answer question data learn align prefer chosen rejected helpful honest harmless short long "
         "python code write explain list three ways improve sleep time stress health water tree river city "
         "because however therefore example first second finally yes no maybe please thank you").split()


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is not available")
    return p


def make_tiny_model(target: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with a BPE tokenizer trained here, ChatML tokens and SmolLM2's chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from alignment.models import SMOLLM2_CHAT_TEMPLATE

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(400)]
    corpus += ["0 1 2 3 4 5 6 7 8 9 10 Assistant Score: [Question] [The Start of Assistant 1's Answer]"] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = SMOLLM2_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = fast.pad_token_id
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One embedded local Ray for every test that needs it (startup costs seconds)."""
    import ray

    from alignment.ray_env import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_storage():
    """``(uri, filesystem)``: a bucket on an S3 endpoint on the loopback (moto's server, in this process), as
    a cloud storage URI with pyarrow's options, and the pyarrow file system to look into it."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    uri = f"s3://alignment-test/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
    fs.create_dir("alignment-test")
    yield uri, fs
    server.stop()


@pytest.fixture()
def sft_rows() -> list[dict]:
    rng = random.Random(1)
    rows = []
    for i in range(24):
        q = " ".join(rng.choice(WORDS) for _ in range(6))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


@pytest.fixture()
def pref_pairs() -> list[dict]:
    rng = random.Random(2)
    pairs = []
    for i in range(16):
        q = " ".join(rng.choice(WORDS) for _ in range(6))
        pairs.append({"id": f"p{i}", "prompt": [{"role": "user", "content": q}],
                      "chosen": "helpful honest answer " + " ".join(rng.choice(WORDS) for _ in range(5)),
                      "rejected": "no " + " ".join(rng.choice(WORDS) for _ in range(5))})
    return pairs


def chat_completion(content: str, top_logprobs: list[dict] | None = None, completion_tokens: int = 5) -> dict:
    """An OpenAI chat completion answering ``content``; with ``top_logprobs`` (``[{"token", "logprob"}]``) its
    first token's top log-probabilities too, as OpenAI's ``logprobs.content[0].top_logprobs``."""
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if top_logprobs is not None:
        first = top_logprobs[0] if top_logprobs else {"token": content, "logprob": 0.0}
        choice["logprobs"] = {"content": [{"token": first["token"], "logprob": first["logprob"],
                                           "top_logprobs": top_logprobs}]}
    return {"choices": [choice], "usage": {"completion_tokens": completion_tokens}}


def _default_reply(body: dict) -> dict | int:
    """The fake endpoint's answer unless a test gives its own: a 500 to a prompt holding "fail", else two scores."""
    if "fail" in body["messages"][-1]["content"]:
        return 500
    return chat_completion(f"8 3\nbecause {body['model']}")


class FakeOpenAI(list):
    """A chat-completions endpoint on the loopback (the ``fake_endpoint`` fixture) and the requests it got, in
    order of arrival: ``{"path", "auth", "body"}``. ``url`` and ``key`` are what TEST_JUDGE_URL and TEST_JUDGE_KEY
    hold. ``reply`` answers a request body: a dict (a chat completion, see :func:`chat_completion`), an HTTP status
    alone (an int), or ``(status, dict)``; set it to answer otherwise than :func:`_default_reply`."""

    def __init__(self, url: str, key: str):
        super().__init__()
        self.url, self.key = url, key
        self.reply = _default_reply
        self.lock = threading.Lock()


class _FakeOpenAI(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        answer = fake.reply(body)
        if isinstance(answer, int):
            status, obj = answer, None
        elif isinstance(answer, tuple):
            status, obj = answer
        else:
            status, obj = 200, answer
        data = json.dumps(obj).encode() if obj is not None else b""
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_endpoint(monkeypatch):
    """A :class:`FakeOpenAI` endpoint (many requests at once), its URL and key in TEST_JUDGE_URL / TEST_JUDGE_KEY."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    server.daemon_threads = True
    fake = FakeOpenAI(f"http://127.0.0.1:{server.server_port}/v1", "sk-secret-123")
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TEST_JUDGE_URL", fake.url)
    monkeypatch.setenv("TEST_JUDGE_KEY", fake.key)
    yield fake
    server.shutdown()
    server.server_close()


# Trainer settings of the unit tests (train.build_trainer's settings dict).
SETTINGS = {"max_steps": 10, "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
            "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "max_length": 128,
            "save_only_model": True, "gradient_checkpointing": None, "lora": None, "seed": 0, "use_gpu": False}


def tiny_experiment(tmp_path: Path, tiny_model: Path) -> dict:
    return {
        "name": "tiny",
        "run_dir": str(tmp_path / "run"),
        "model": {"base": str(tiny_model)},
        "data": {"sft": [str(EXAMPLES / "sft_alpaca.jsonl"), str(EXAMPLES / "sft_sharegpt.json")],
                 "preferences": [str(EXAMPLES / "preferences_hh.jsonl")],
                 "eval_prompts": str(EXAMPLES / "eval_prompts.jsonl"), "max_eval_prompts": 4},
        "select": {"k": 8, "length_unit": "tokens"},
        "sft": {"max_steps": 4, "save_at": [2, 4], "learning_rate": 1e-3, "per_device_batch_size": 2,
                "max_length": 128, "save_only_model": True},
        "pref": {"start_from": "sft", "sft_step": 2, "max_steps": 2, "learning_rate": 1e-3,
                 "per_device_batch_size": 2, "max_length": 128, "num_pairs": 8},
        "generate": {"max_new_tokens": 8, "batch_size": 4, "cpus_per_actor": 1.0},
        "judge": {"model": str(tiny_model), "rule": "sum", "max_new_tokens": 6},
        "search": {"k": [8], "sft_step": [2, 4]},
        "resources": {"num_workers": 1, "cpus_per_worker": 1.0, "cpus_per_trial": 0.5},
    }


def write_config(tmp_path: Path, exp: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def stop_head(temp: Path) -> None:
    """Stop only the head this test started: the processes whose command lines name its temp dir, and all
    their descendants (Ray renames workers and agents, e.g. ``ray::DashboardAgent``). `ray stop` would
    also stop the test session's own local Ray."""
    import psutil

    procs = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(str(temp) in part for part in (p.info["cmdline"] or [])):
                procs.add(p)
                procs.update(p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = list(procs)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    time.sleep(1)
