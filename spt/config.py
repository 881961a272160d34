"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

    spt train --config configs/spt-opt125m-convai2.yaml --train.max_steps=20 --spt.K=4

Every field is documented once, here. Invalid values fail on load with the field's dotted name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Method = Literal["spt", "pt", "textual", "finetune", "lora"]


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted field."""


@dataclass
class ScratchConfig:
    """Shape of a GPT-2 style LM built from random initialisation (``model.init: scratch``)."""

    n_layer: int = 2  # transformer blocks
    n_embd: int = 64  # model width
    n_head: int = 4  # attention heads (must divide n_embd)
    n_positions: int = 512  # longest sequence, soft prompt included
    vocab_size: int = 2048  # size of the BPE tokenizer trained on the training data


@dataclass
class ModelConfig:
    name_or_path: str = "gpt2"  # hub name or local folder of the base causal LM
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype of the frozen LM weights
    # pretrained: load name_or_path; scratch: build model.scratch from random weights
    init: Literal["pretrained", "scratch"] = "pretrained"
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    gradient_checkpointing: bool = False  # trade compute for activation memory on large models


@dataclass
class DataConfig:
    train: str | None = None  # data file (any supported format)
    valid: str | None = None  # validation file: loss and routing diagnostics every train.eval_every
    test: str | None = None  # used by generate/eval when no file is given
    format: Literal["parlai", "json", "spc", "jsonl"] | None = None  # None: detect from the file
    max_length: int = 512  # text tokens per example (soft prompt tokens come on top)
    max_context_turns: int | None = None  # keep only the newest N history turns
    strict: bool = False  # fail on malformed input instead of skipping (counted, logged)
    instruction: str = ""  # text placed before "given persona:" (textual prompting's instruction template)
    max_train_examples: int | None = None  # first N examples only (quick runs)
    max_valid_examples: int | None = None  # first N validation examples only


Recipe = Literal["routed", "paper"]

# What ``spt.recipe`` sets. A field left unset (None) takes its recipe's value; an explicit value wins.
# "paper" is the paper's (and its code's) equations exactly; "routed" adds what makes selection work on
# any model: centred features, prompt keys started at k-means centroids, sharp temperatures, softmax
# fusion, an LM loss weighted by routing, and load balancing (README: "Routing recipe").
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"center_features": False, "keys": "prompt_mean", "tau_sim": 1.0, "tau_gold": 1.0,
              "sel_target": "loss", "balance_target": False, "lm_weighting": "uniform", "lambda_fus": 1.0,
              "fusion_weights": "raw", "lambda_ctr": 0.4, "lambda_bal": 0.0, "sel_replay": 0},
    "routed": {"center_features": True, "keys": "kmeans", "tau_sim": 0.1, "tau_gold": 1.0,
               "sel_target": "posterior", "balance_target": False, "lm_weighting": "posterior", "lambda_fus": 0.0,
               "fusion_weights": "softmax", "lambda_ctr": 0.0, "lambda_bal": 0.1, "sel_replay": 32},
}


@dataclass
class SPTConfig:
    K: int = 4  # number of soft prompts in the bank
    num_virtual_tokens: int = 8  # n: tokens per soft prompt
    prompt_init: Literal["vocab", "random", "text"] = "vocab"  # sampled vocabulary embeddings by default
    prompt_init_text: str = ""  # with prompt_init: text, e.g. "respond in character :"
    # start the bank from PEFT prompt-tuning adapter folders (e.g. written by `spt export`) instead of
    # prompt_init: one folder is copied into all K slots, or exactly K folders, one per slot. A fresh run only
    # (not on resume); --spt.init_from_peft=DIR or =DIR1,DIR2 (a YAML list for paths with commas)
    init_from_peft: list[str] | str = field(default_factory=list)
    recipe: Recipe = "routed"  # preset for the fields marked (recipe) below; see RECIPES
    # linear: one projection of the pooled context (paper); transformer: a small encoder over the context first
    retriever: Literal["linear", "transformer"] = "linear"
    # what the retriever reads: the inference input's token embeddings, mean-pooled (paper), or the frozen LM's
    # last hidden state at the end of the inference input (costs one extra forward without the LM head)
    query: Literal["embeddings", "lm_hidden"] = "embeddings"
    retriever_layers: int = 1  # transformer retriever only
    softplus_beta: float = 10.0  # scores S = softplus(cosine) with this beta (paper's retriever)
    softplus_threshold: float = 1.0  # softplus switches to linear above this
    # (recipe) subtract the training contexts' mean pooled embedding before scoring: embedding tables are
    # anisotropic, so raw pooled contexts all point one way and every example picks the same prompt
    center_features: bool | None = None
    # (recipe) what a prompt is scored by: "prompt_mean" = mean of its n tokens (paper); "kmeans" = a key
    # vector of its own, started at a k-means centroid of the training contexts' features
    keys: Literal["prompt_mean", "kmeans"] | None = None
    lambda_llm: float = 1.0  # LM loss weight
    lambda_sel: float = 0.4  # selection loss weight (paper: 0.4 for OPT, 1.0 for Llama-2-7B)
    # (recipe) prompt fusion loss weight. Off in "routed": its gradient into the retriever favours hedged,
    # flat routing (routing accuracy 0.6 instead of 0.98 on the marker task of tests/test_routing.py)
    lambda_fus: float | None = None
    # (recipe) context-prompt contrastive loss weight. Off in "routed": it pushes every two different personas
    # to different prompts, against routing similar ones (e.g. of one style) to the same prompt
    lambda_ctr: float | None = None
    lambda_bal: float | None = None  # (recipe) load balance: KL(mean routing over the batch || uniform)
    # (recipe) what the retriever learns from: "loss" q = softmax(-L / tau_gold), L the mean token NLL (paper);
    # "posterior" q ∝ p * exp(-L_sum / tau_gold), the retriever's routing p updated by how well each prompt
    # explains the response (summed NLL), so equal losses leave the routing as it is instead of flattening it
    sel_target: Literal["loss", "posterior"] | None = None
    # (recipe) balance q over the batch (Sinkhorn) so every prompt gets its share of examples, won by relative
    # advantage. Off in both recipes: measured, it forces an even split the data may not have and routes
    # worse (demo validation routing accuracy 0.76 with it, 0.87 without); lambda_bal and replay keep
    # the routing from collapsing instead
    balance_target: bool | None = None
    tau_gold: float | None = None  # (recipe) temperature of the selection target q
    # (recipe) the selection loss also re-scores the stored query features and targets q of this many recent
    # batches: the retriever is a small model that needs more examples per step than one batch, and
    # features and targets cost nothing to keep (the LM is never re-run for them)
    sel_replay: int | None = None
    tau_sim: float | None = None  # (recipe) temperature of the routing p = softmax(S / tau_sim)
    sel_noise_sigma: float = 0.0  # Gaussian noise on the selection target q (paper's variant: 0.1)
    # (recipe) fusion mixes the K prompts' logits by the raw scores S (paper) or by p = softmax(S / tau_sim)
    fusion_weights: Literal["raw", "softmax"] | None = None
    # (recipe) LM loss over all K x B pairs alike (paper), or each pair weighted (no gradient) by the retriever's
    # routing p ("retriever") or by the selection target q ("posterior", the EM responsibilities), so each
    # prompt learns mostly from the examples it is meant for and the prompts specialise
    lm_weighting: Literal["uniform", "retriever", "posterior"] | None = None
    retriever_lr: float | None = None  # learning rate of the retriever (W, b, keys); None: train.lr
    ctr_bleu_threshold: float = 20.0  # personas with sentence BLEU above this are "similar"
    selection_noise: float = 0.0  # Gaussian noise on scores before argmax at inference

    def __post_init__(self) -> None:
        if isinstance(self.init_from_peft, str):  # "--spt.init_from_peft=A,B" on the command line
            self.init_from_peft = [p.strip() for p in self.init_from_peft.split(",") if p.strip()]
        if self.recipe not in RECIPES:
            raise ConfigError(f"spt.recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)


@dataclass
class BaselineConfig:
    """Options of the baselines (methods finetune and lora)."""

    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA path
    lora_target_modules: list[str] | None = None  # None: peft's default for the model family
    loss_on: Literal["response", "all"] = "response"  # finetune: "all" trains every token (LM pretraining)


@dataclass
class TrainConfig:
    lr: float = 1e-4  # AdamW learning rate (peak, after warmup)
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 8  # examples per forward (per process)
    grad_accum: int = 1  # forwards per optimizer step
    epochs: int = 1  # passes over the training data, unless max_steps is set
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0
    scheduler: Literal["linear", "cosine", "constant"] = "linear"  # learning-rate schedule after warmup
    max_grad_norm: float = 1.0  # gradient clipping norm; 0: no clipping
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where supported
    seed: int = 42  # seeds data order, initialisation and every RNG
    eval_every: int = 0  # optimizer steps between validations; 0: once per epoch
    log_every: int = 10  # optimizer steps between training log rows (metrics.csv)
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    # max (prompt, example) rows per LM forward; None: all K*B at once; auto: as many as fit in the free memory
    # (GPU, or the RAM available to a CPU run), estimated per batch from its length and the model's shape.
    # Chunking never changes results; it bounds the forward's peak, not the activations kept for the backward
    chunk_size: int | Literal["auto"] | None = None
    group_by_length: bool = True  # batch similar lengths together (less padding)
    eval_batch_size: int = 16  # examples per forward in validation


@dataclass
class GenerateConfig:
    max_new_tokens: int = 32  # the paper's evaluation: greedy, 32 new tokens
    batch_size: int = 16  # examples per generate call
    num_beams: int = 1  # beam search width; 1: greedy (or sampling)
    do_sample: bool = False  # sample instead of greedy/beam search
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # 0: no top-k filtering
    repetition_penalty: float = 1.0  # HF repetition penalty; 1: none
    no_repeat_ngram_size: int = 0  # the paper's chat: 4 (with num_beams 10)
    stop: list[str] = field(default_factory=lambda: ["Q:", "R:", "\n", ":"])  # cut the reply at the first
    seed: int = 0  # seed of sampling
    # precision of the input (prefill) forward: "fp32" (the LM's own), or "bf16" (autocast; decoding stays in the
    # LM's precision). bf16 makes large batches (spt serve) much cheaper on GPUs and AMX CPUs; a reply can differ
    # from fp32's where two next tokens are near-tied. Beam search always prefills in the LM's precision.
    prefill_precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class EvalConfig:
    bertscore_model: str | None = None  # None: the paper's deberta-xlarge-mnli online, a local MiniLM offline
    bertscore_layers: int | None = None  # layer of the BERTScore model; None: bert-score's default for it
    meteor: bool = True  # computed when NLTK's WordNet data is available; otherwise reported as skipped
    samples: int = 10  # sample predictions in the report


@dataclass
class ServeConfig:
    """Limits of ``spt serve`` (the OpenAI-compatible HTTP endpoint); a request over a limit gets a 4xx."""

    max_new_tokens: int = 128  # the most new tokens a request may ask for (max_tokens); more is a 400
    # the longest inference input (persona + history as formatted, in tokens); None: data.max_length minus the
    # request's max_tokens, exactly as in training. Longer inputs are truncated by the training rule (oldest
    # turns first, then persona from the left), or refused with 413 when reject_long_inputs is set
    max_input_tokens: int | None = None
    reject_long_inputs: bool = False  # 413 for inputs over max_input_tokens instead of truncating them
    max_batch: int = 16  # most rows (requests x n) in one generate call; 1 turns batching off
    batch_window_ms: float = 5.0  # how long the first waiting request waits for others to share its batch
    request_timeout_s: float = 60.0  # a request not answered by then gets a 504
    max_queue: int = 256  # requests waiting or running at once; more get a 429
    max_body_bytes: int = 1_000_000  # larger request bodies get a 413
    max_n: int = 8  # most choices (n) per request

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_batch", "request_timeout_s", "max_queue", "max_body_bytes", "max_n"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"serve.{name} must be > 0, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ConfigError(f"serve.batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.max_input_tokens is not None and self.max_input_tokens < 8:
            raise ConfigError(f"serve.max_input_tokens must be >= 8 or null, got {self.max_input_tokens}")


@dataclass
class Config:
    method: Method = "spt"  # what trains: spt, pt (one prompt), textual, finetune or lora
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    spt: SPTConfig = field(default_factory=SPTConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if self.method == "pt":  # prompt tuning is SPT with one prompt and the LM loss only
            self.spt.K, self.spt.lambda_sel, self.spt.lambda_fus, self.spt.lambda_ctr = 1, 0.0, 0.0, 0.0
            self.spt.lambda_bal, self.spt.lm_weighting = 0.0, "uniform"
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def resolve_paths(cfg: Config) -> Config:
    """Local data files and base model folders as absolute paths, so a run folder works from anywhere.
    Names that are not local paths (hub ids) stay as they are."""
    def absolute(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    data = {f: absolute(getattr(cfg.data, f)) for f in ("train", "valid", "test")}
    model = {f: absolute(getattr(cfg.model, f)) for f in ("name_or_path", "tokenizer")}
    adapters = [absolute(p) for p in cfg.spt.init_from_peft]  # the bank's origin, recorded usably
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data),
                               model=dataclasses.replace(cfg.model, **model),
                               spt=dataclasses.replace(cfg.spt, init_from_peft=adapters))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: dotted names, as overrides spell them."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    for name, value in flatten(dataclasses.asdict(cfg)).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    positive = {
        "spt.K": cfg.spt.K, "spt.num_virtual_tokens": cfg.spt.num_virtual_tokens, "train.lr": cfg.train.lr,
        "train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
        "train.epochs": cfg.train.epochs, "spt.tau_gold": cfg.spt.tau_gold, "spt.tau_sim": cfg.spt.tau_sim,
        "spt.softplus_beta": cfg.spt.softplus_beta, "data.max_length": cfg.data.max_length,
        "train.eval_batch_size": cfg.train.eval_batch_size, "train.max_bad_steps": cfg.train.max_bad_steps,
        "train.log_every": cfg.train.log_every, "model.scratch.n_layer": cfg.model.scratch.n_layer,
        "model.scratch.n_embd": cfg.model.scratch.n_embd, "model.scratch.n_head": cfg.model.scratch.n_head,
        "spt.retriever_layers": cfg.spt.retriever_layers, "generate.max_new_tokens": cfg.generate.max_new_tokens,
        "generate.batch_size": cfg.generate.batch_size, "generate.num_beams": cfg.generate.num_beams,
        "generate.temperature": cfg.generate.temperature, "generate.top_p": cfg.generate.top_p,
        "generate.repetition_penalty": cfg.generate.repetition_penalty,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    non_negative = {
        "spt.lambda_llm": cfg.spt.lambda_llm, "spt.lambda_sel": cfg.spt.lambda_sel,
        "spt.lambda_fus": cfg.spt.lambda_fus, "spt.lambda_ctr": cfg.spt.lambda_ctr,
        "spt.lambda_bal": cfg.spt.lambda_bal, "spt.sel_replay": cfg.spt.sel_replay,
        "spt.sel_noise_sigma": cfg.spt.sel_noise_sigma, "spt.selection_noise": cfg.spt.selection_noise,
        "train.weight_decay": cfg.train.weight_decay, "train.warmup_steps": cfg.train.warmup_steps,
        "train.max_grad_norm": cfg.train.max_grad_norm, "train.eval_every": cfg.train.eval_every,
        "generate.top_k": cfg.generate.top_k, "generate.no_repeat_ngram_size": cfg.generate.no_repeat_ngram_size,
        "eval.samples": cfg.eval.samples,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    for name, value in {"spt.retriever_lr": cfg.spt.retriever_lr, "train.max_steps": cfg.train.max_steps,
                        "data.max_train_examples": cfg.data.max_train_examples,
                        "data.max_valid_examples": cfg.data.max_valid_examples}.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be > 0 or null, got {value}")
    if isinstance(cfg.train.chunk_size, int) and cfg.train.chunk_size <= 0:
        raise ConfigError(f"train.chunk_size must be > 0, auto or null, got {cfg.train.chunk_size}")
    if cfg.generate.max_new_tokens >= cfg.data.max_length:
        raise ConfigError(f"generate.max_new_tokens ({cfg.generate.max_new_tokens}) must be smaller than "
                          f"data.max_length ({cfg.data.max_length}): the reply's input needs room too")
    if cfg.data.max_context_turns is not None and cfg.data.max_context_turns < 0:
        raise ConfigError(f"data.max_context_turns must be >= 0 or null, got {cfg.data.max_context_turns}")
    if cfg.spt.prompt_init == "text" and not cfg.spt.prompt_init_text.strip():
        raise ConfigError("spt.prompt_init_text must be set when spt.prompt_init is 'text'")
    if cfg.spt.init_from_peft and cfg.method not in ("spt", "pt"):
        raise ConfigError(f"spt.init_from_peft starts a prompt bank: it needs method spt or pt, got {cfg.method}")
    if cfg.model.init == "scratch" and cfg.method != "finetune":
        raise ConfigError(f"model.init=scratch needs method=finetune (got {cfg.method}): train the base LM first, "
                          "then point model.name_or_path at its checkpoint")
    if cfg.baseline.lora_r <= 0 or not 0 <= cfg.baseline.lora_dropout < 1:
        raise ConfigError(f"baseline.lora_r must be > 0 and baseline.lora_dropout in [0, 1), got "
                          f"{cfg.baseline.lora_r}, {cfg.baseline.lora_dropout}")
    if cfg.model.scratch.n_embd % cfg.model.scratch.n_head:
        raise ConfigError(f"model.scratch.n_embd ({cfg.model.scratch.n_embd}) must be divisible by "
                          f"model.scratch.n_head ({cfg.model.scratch.n_head})")


# --- building from dicts, YAML and overrides ----------------------------------------------------

_YAML_BOOL_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: "--train.mixed_precision=no"
            value = next((c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOL_WORDS[value]), value)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return _build(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


# Names other tools use for our settings (HF Trainer, PEFT, ...), for "did you mean".
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "warmup": "warmup_steps",
           "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
           "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
           "lr_scheduler_type": "scheduler", "lr_scheduler": "scheduler", "max_seq_length": "max_length",
           "max_len": "max_length", "model_name": "name_or_path", "model_name_or_path": "name_or_path",
           "k": "K", "num_prompts": "K", "n_prompts": "K", "prompt_length": "num_virtual_tokens",
           "n_tokens": "num_virtual_tokens", "max_grad_norm_": "max_grad_norm", "beams": "num_beams",
           "max_tokens": "max_new_tokens", "fp16": "mixed_precision", "bf16": "mixed_precision"}


def _suggest(name: str, known: list[str]) -> str:
    """" (did you mean X?)" for a misspelt or foreign setting name, from the names in ``known``."""
    import difflib

    section, _, leaf = name.rpartition(".")
    prefix = f"{section}." if section else ""
    alias = ALIASES.get(leaf) or ALIASES.get(leaf.lower())
    if alias and prefix + alias in known:
        return f" (did you mean {prefix + alias}?)"
    siblings = [k.removeprefix(prefix) for k in known if k.startswith(prefix) and "." not in k.removeprefix(prefix)]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix + close[0]}?)"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError("unknown config key(s) " + ", ".join(where + k + _suggest(k, sorted(known))
                                                                for k in unknown)
                          + f"; known in {prefix or 'the top level'}: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data)


@functools.cache
def field_docs() -> dict[str, tuple[Any, str]]:
    """Every setting as ``{"train.lr": (declared default, doc)}``; the doc is the comment beside or above the
    field in this file (one place to document a setting). Recipe fields show their declared None (= the
    recipe decides). Parsed once per process."""
    import ast
    import inspect

    source = inspect.getsource(inspect.getmodule(Config))
    lines = source.splitlines()
    comments: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            text = lines[item.lineno - 1]
            trailing = text.split("  # ", 1)[1].strip() if "  # " in text else ""
            above, i = [], item.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            comments[(node.name, item.target.id)] = " ".join([*above, trailing]).strip()
    out: dict[str, tuple[Any, str]] = {}

    def walk(cls: type, prefix: str) -> None:  # the declarations themselves: no instance, no recipe resolved
        for f in dataclasses.fields(cls):
            factory = f.default_factory
            if isinstance(factory, type) and dataclasses.is_dataclass(factory):
                walk(factory, f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else factory()
                out[f"{prefix}{f.name}"] = (default, comments.get((cls.__name__, f.name), ""))

    walk(Config, "")
    return out


def describe(cfg: Config) -> str:
    """The resolved config as YAML, each setting followed by its doc and, where it differs, its default."""
    docs = field_docs()
    lines: list[str] = []
    section_of: dict[str, str] = {}
    for dotted, value in flatten(cfg.to_dict()).items():
        parts = dotted.split(".")
        for depth in range(len(parts) - 1):
            head = ".".join(parts[:depth + 1])
            if head not in section_of:
                section_of[head] = head
                lines.append("  " * depth + f"{parts[depth]}:")
        default, doc = docs.get(dotted, (None, ""))
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        note = doc + (f" [default: {default}]" if default != value else "")
        lines.append("  " * (len(parts) - 1) + f"{parts[-1]}: {text}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted settings whose values differ between two flattened configs, sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def show_change(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    return f"{key} ({old.get(key)!r} -> {new.get(key)!r})"


def _check_override_keys(overrides: dict[str, Any]) -> None:
    """An override naming no setting is an error about the flag itself, with the nearest name."""
    known = list(field_docs())
    sections = {k.rsplit(".", 1)[0] for k in known if "." in k}
    for dotted in overrides:
        if dotted not in known and dotted not in sections:
            raise ConfigError(f"--{dotted}: no such setting{_suggest(dotted, known)}; "
                              "`spt config show` lists them all")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.max_steps=20", "--spt.K", "4"]`` -> {"train.max_steps": 20, "spt.K": 4} (YAML-typed)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or ("." not in arg.split("=", 1)[0] and arg[2:].split("=", 1)[0] != "method"):
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --section.field=value")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            raw, i = args[i + 1], i + 1
        out[key] = yaml.safe_load(raw) if raw != "" else ""
        i += 1
    return out


SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def find_config(path: str | Path) -> Path:
    """A config file by path, or a shipped config by name (``tiny-cpu``, ``spt-opt125m-convai2``)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(f"config file {path} not found (shipped configs, usable by name: "
                      f"{', '.join(shipped_configs())})")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then dotted overrides; validated as a whole."""
    data: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): is it a config file?") from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer of thousands of digits
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data = loaded
    _check_override_keys(overrides or {})
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
