"""What differs between training methods, behind one small interface the trainer, generator and API use.

- ``spt``: a bank of K soft prompts + retriever on a frozen LM (checkpoint: those tensors only).
- ``pt``: SPT with K=1 and the LM loss only (the config enforces it).
- ``textual``: the frozen LM with persona and context in a textual prompt; nothing trains.
- ``finetune``: every LM weight trains with the LM loss (checkpoint: a HuggingFace model folder);
  ``model.init: scratch`` builds the LM and a BPE tokenizer from the training data first.
- ``lora``: LoRA adapters via peft (checkpoint: a PEFT adapter folder).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import distributed
from .batching import EncodedDataset, collate
from .checkpoint import (
    CONFIG,
    atomic_dir,
    check_base_model,
    check_shapes,
    checkpoint_config,
    read_trainable,
    resolve_checkpoint,
    save_trainable,
    write_trainer_state,
)
from .config import Config, GenerateConfig
from .format import IGNORE_INDEX, DialogueFormatter, render_text
from .generate import Generation, generate_spt, generate_text
from .model import SPTModel, mask_positions, response_logits, takes_position_ids
from .modeling import build_scratch_lm, load_lm, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


def disable_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def max_positions(lm) -> int | None:
    """How many positions the LM can attend over, from its config (None when it does not say)."""
    c = lm.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(c, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(cfg: Config, lm) -> None:
    """data.max_length plus the soft prompt must fit the LM's positions: fail at load, naming what to set,
    rather than with an IndexError mid-training."""
    limit = max_positions(lm)
    prompt = cfg.spt.num_virtual_tokens if cfg.method in ("spt", "pt") else 0
    if limit is not None and cfg.data.max_length + prompt > limit:
        extra = f" plus the {prompt} virtual tokens of spt.num_virtual_tokens" if prompt else ""
        raise ValueError(f"data.max_length={cfg.data.max_length}{extra} exceeds the {limit} positions of "
                         f"{cfg.model.name_or_path!r}: set --data.max_length={limit - prompt} or less")


def build_lm(cfg: Config, weights: str | None = None):
    """(LM, tokenizer) for ``cfg.model``; ``weights`` overrides where the LM (and tokenizer) load from."""
    lm, tokenizer = _build_lm(cfg, weights)
    check_lengths(cfg, lm)
    return lm, tokenizer


def _build_lm(cfg: Config, weights: str | None = None):
    if cfg.model.init == "scratch" and weights is None:
        return _scratch_lm(cfg)
    source = weights or cfg.model.name_or_path
    tokenizer = load_tokenizer(weights or cfg.model.tokenizer or cfg.model.name_or_path)
    lm = load_lm(source, cfg.model.dtype)
    rows = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"tokenizer of {source!r} has {len(tokenizer)} tokens but the model's embedding table {rows}")
    return lm, tokenizer


def _scratch_lm(cfg: Config):
    from .data import read_examples

    if not cfg.data.train:
        raise ValueError("model.init=scratch trains a tokenizer on data.train, which is not set")
    examples = read_examples(cfg.data.train, cfg.data.format, cfg.data.strict)
    texts = [render_text(e.persona, e.context, e.response) for e in examples]
    s = cfg.model.scratch
    tokenizer = train_tokenizer(texts, s.vocab_size)
    lm = build_scratch_lm(len(tokenizer), s.n_layer, s.n_embd, s.n_head, s.n_positions, tokenizer.eos_token_id,
                          seed=cfg.train.seed)
    log.info("built a %d-layer, width-%d LM (%.2fM parameters) and a %d-token BPE tokenizer from scratch",
             s.n_layer, s.n_embd, sum(p.numel() for p in lm.parameters()) / 1e6, len(tokenizer))
    return lm, tokenizer


class Method:
    """The interface: a trainable ``model`` whose forward returns named losses, plus save/load/generate."""

    trains = True
    needs_persona_similarity = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer = None
        self.model: nn.Module

    def formatter(self) -> DialogueFormatter:
        d = self.cfg.data
        return DialogueFormatter(self.tokenizer, d.max_length, d.max_context_turns, d.instruction)

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "query_mask")}

    @property
    def num_prompts(self) -> int | None:
        return None

    def prepare(self, train_ds: EncodedDataset) -> None:
        """Data-dependent initialisation before the first step of a fresh run (not on resume)."""

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """How many target tokens the LM loss of ``batch`` averages over (data parallelism weights ranks by it)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def training_state(self) -> dict:
        """State outside the parameters and optimizer that an exact resume needs (in trainer_state)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore what ``training_state`` returned."""

    def _loader(self, ds: EncodedDataset, batch_size: int) -> DataLoader:
        """Batches of this rank's share of ``ds`` (all of it in one process); reduce sums with ``sum_across``."""
        part = Subset(ds, distributed.shard(range(len(ds)))) if distributed.is_distributed() else ds
        return DataLoader(part, batch_size=batch_size, collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))


class SPTMethod(Method):
    """Soft-prompt bank + retriever on a frozen LM (methods ``spt`` and ``pt``)."""

    def __init__(self, cfg: Config, checkpoint: Path | None = None):
        super().__init__(cfg)
        lm, self.tokenizer = build_lm(cfg)
        disable_dropout(lm)
        if cfg.model.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        text_ids = self.tokenizer(cfg.spt.prompt_init_text, add_special_tokens=False)["input_ids"] \
            if cfg.spt.prompt_init == "text" else None
        self.model = SPTModel(lm, cfg.spt, text_ids, seed=cfg.train.seed)
        self.model.chunk_size = cfg.train.chunk_size
        self.model.train()
        self.needs_persona_similarity = cfg.spt.lambda_ctr > 0 and cfg.spt.K > 1
        if checkpoint is not None:
            tensors = read_trainable(checkpoint)
            check_shapes(self.model.trainable_state_dict(), tensors, checkpoint, cfg.model.name_or_path)
            self.model.load_state_dict(tensors, strict=False)

    @property
    def num_prompts(self) -> int:
        return self.model.K

    def training_state(self) -> dict:
        return {"routing": self.model.routing_state()}

    def load_training_state(self, state: dict) -> None:
        if "routing" in state:
            self.model.load_routing_state(state["routing"])

    @torch.no_grad()
    def prepare(self, train_ds: EncodedDataset, max_examples: int = 8192, batch_size: int = 64) -> None:
        """The bank from spt.init_from_peft (if set), then the retriever's centre and k-means keys from (up to
        ``max_examples``) training contexts."""
        if self.cfg.spt.init_from_peft:
            from .export import init_bank_from_peft

            init_bank_from_peft(self.model, self.cfg)
        r = self.model.retriever
        if self.model.K == 1 or (r.center is None and r.keys is None):
            return  # one prompt (PT) is always selected: nothing to route
        step = max(1, len(train_ds) // max_examples)
        items = [train_ds[i] for i in range(0, len(train_ds), step)][:max_examples]
        device = self.model.prompts.device
        batches = []
        for i in range(0, len(items), batch_size):
            b = collate(items[i:i + batch_size], self.tokenizer.pad_token_id)
            batches.append(self.model.query(b["input_ids"].to(device), b["query_mask"].to(device)))
        assign = self.model.init_routing(batches, seed=self.cfg.train.seed)
        if assign is not None:
            log.info("retriever keys at k-means centroids of %d training contexts; cluster sizes %s",
                     len(items), torch.bincount(assign, minlength=self.model.K).tolist())

    def save(self, folder: Path, cfg: Config, trainer_state: dict | None,
             tensors: dict[str, torch.Tensor] | None = None) -> None:
        """``tensors``: the trainable state gathered from sharded parameters (FSDP, ZeRO-3), if not the model's."""
        save_trainable(folder, self.model.trainable_state_dict() if tensors is None else tensors, cfg, trainer_state)

    def generate(self, examples, gen: GenerateConfig, progress: bool = False,
                 score_references: bool = True) -> list[Generation]:
        return generate_spt(self.model, self.tokenizer, self.formatter(), examples, gen,
                            self.cfg.spt.selection_noise, score_references, progress)

    @torch.no_grad()
    def evaluate_loss(self, ds: EncodedDataset, batch_size: int, device, autocast) -> dict:
        """Validation loss under the retriever's pick, plus oracle/mean-prompt losses and selection stats."""
        model = self.model
        was_training = model.training
        model.eval()
        sums = {"selected": 0.0, "oracle": 0.0, "mean_prompt": 0.0}
        tokens = hits = n = 0
        hist = torch.zeros(model.K)
        for batch in self._loader(ds, batch_size):
            with autocast():
                p = model.pairs(**self.model_inputs(batch, device))
            counts = torch.bincount(p.token_example, minlength=p.L.shape[1]).float()
            k = p.S.argmax(0)
            sums["selected"] += float((p.L.gather(0, k[None])[0] * counts).sum())
            sums["oracle"] += float((p.L.min(0).values * counts).sum())
            sums["mean_prompt"] += float((p.L.mean(0) * counts).sum())
            tokens += int(counts.sum())
            hits += int((k == p.L.argmin(0)).sum())
            n += p.L.shape[1]
            hist += torch.bincount(k.cpu(), minlength=model.K).float()
        model.train(was_training)
        keys = sorted(sums)  # every rank scored its shard: add them up
        totals = distributed.sum_across([*(sums[k] for k in keys), tokens, hits, n, *hist.tolist()])
        sums = dict(zip(keys, totals[:3], strict=True))
        tokens, hits, n = totals[3:6]
        hist = torch.tensor(totals[6:])
        loss = sums["selected"] / tokens
        out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "loss_oracle": sums["oracle"] / tokens,
               "loss_mean_prompt": sums["mean_prompt"] / tokens, "select_acc": hits / n}
        if model.K > 1:
            out.update(routing_diagnostics(hist.long().tolist()))
        return out


def routing_diagnostics(hist: list[int]) -> dict:
    """Selection histogram -> entropy, its share of the maximum, the largest prompt's share and each
    prompt's share (floats, so they reach metrics.csv); warns when routing has (nearly) collapsed."""
    from .metrics import COLLAPSE_SHARE, histogram_stats

    stats = histogram_stats(hist)
    total = max(1, sum(hist))
    out = {"selection": hist, "sel_entropy": stats["entropy"], "sel_entropy_norm": stats["entropy_normalized"],
           "sel_max_share": max(hist) / total, **{f"sel_share_{k}": c / total for k, c in enumerate(hist)}}
    if out["sel_max_share"] > COLLAPSE_SHARE:
        log.warning("routing collapse: prompt %d takes %.0f%% of the selections (histogram %s); see the README's "
                    "'Routing recipe' for the switches that prevent it", hist.index(max(hist)),
                    100 * out["sel_max_share"], hist)
    return out


class LMOnly(nn.Module):
    """A causal LM trained (or not) with the LM loss alone; the LM head runs at labelled positions only."""

    def __init__(self, lm: nn.Module, loss_on: str = "response"):
        super().__init__()
        self.lm = lm
        self.loss_on = loss_on
        body = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft: LoRA layers live inside
        self._body = [body]  # not a submodule: its parameters are already lm's
        self._takes_positions = takes_position_ids(body)

    def response_logits(self, input_ids, attention_mask, labels):
        body = self._body[0]
        if self.loss_on == "all":
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return response_logits(body, body.get_input_embeddings()(input_ids), attention_mask,
                               mask_positions(attention_mask), labels,
                               self._takes_positions)

    def forward(self, input_ids, attention_mask, labels, query_mask=None, persona_sim=None):
        logits, targets = self.response_logits(input_ids, attention_mask, labels)
        loss = F.cross_entropy(logits.float(), targets)
        return {"loss": loss, "llm": loss}


class LMMethod(Method):
    """Methods without a prompt bank: ``textual`` (no training), ``finetune`` and ``lora``."""

    needs_persona_similarity = False

    def __init__(self, cfg: Config, checkpoint: Path | None = None):
        super().__init__(cfg)
        self.trains = cfg.method != "textual"
        weights = str(checkpoint) if checkpoint is not None and cfg.method == "finetune" else None
        lm, self.tokenizer = build_lm(cfg, weights)
        if cfg.method == "lora":
            lm = self._with_lora(lm, checkpoint)
        elif cfg.method == "textual":
            lm.requires_grad_(False)
        if cfg.model.gradient_checkpointing and self.trains:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = LMOnly(lm, cfg.baseline.loss_on if cfg.method == "finetune" else "response")
        self.model.train(self.trains)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if self.model.loss_on == "all":  # every real token after the first is a target
            return int((batch["attention_mask"][:, 1:] != 0).sum())
        return super().loss_tokens(batch)

    def _with_lora(self, lm, checkpoint: Path | None):
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            return PeftModel.from_pretrained(lm, str(checkpoint), is_trainable=True)
        b = self.cfg.baseline
        lora = LoraConfig(task_type="CAUSAL_LM", r=b.lora_r, lora_alpha=b.lora_alpha, lora_dropout=b.lora_dropout,
                          target_modules=b.lora_target_modules)
        try:
            return get_peft_model(lm, lora)
        except ValueError as e:
            raise ValueError(f"LoRA could not be applied to {self.cfg.model.name_or_path!r}: {e}; set "
                             f"baseline.lora_target_modules to the names of its linear layers") from None

    def save(self, folder: Path, cfg: Config, trainer_state: dict | None) -> None:
        lm = self.model.lm

        def write(tmp: Path) -> None:
            if cfg.method in ("finetune", "lora"):
                lm.save_pretrained(tmp)  # finetune: a HF model folder; lora: adapter_model + adapter_config
            if cfg.method == "finetune":
                self.tokenizer.save_pretrained(tmp)
            cfg.save(tmp / CONFIG)
            if trainer_state is not None:
                write_trainer_state(tmp, trainer_state)

        atomic_dir(folder, write)

    def generate(self, examples, gen: GenerateConfig, progress: bool = False,
                 score_references: bool = True) -> list[Generation]:
        return generate_text(self.model, self.tokenizer, self.formatter(), examples, gen, score_references, progress)

    @torch.no_grad()
    def evaluate_loss(self, ds: EncodedDataset, batch_size: int, device, autocast) -> dict:
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        for batch in self._loader(ds, batch_size):
            with autocast():
                inputs = self.model_inputs(batch, device)
                logits, targets = self.model.response_logits(inputs["input_ids"], inputs["attention_mask"],
                                                             inputs["labels"])
            total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            tokens += targets.numel()
        self.model.train(was_training)
        total, tokens = distributed.sum_across([total, tokens])
        loss = total / tokens
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


METHODS = {"spt": SPTMethod, "pt": SPTMethod, "textual": LMMethod, "finetune": LMMethod, "lora": LMMethod}


def build_method(cfg: Config, checkpoint: Path | None = None) -> Method:
    """The method of ``cfg``, fresh or with the trained state of ``checkpoint``."""
    check_base_model(cfg, checkpoint)  # a moved base model: one clear line, not the hub's repo-id error
    return METHODS[cfg.method](cfg, checkpoint)


def load_method(path: str | Path, device: str | None = None, overrides: dict | None = None) -> Method:
    """Rebuild a trained method (base model + trained state) from a checkpoint or run folder.

    ``overrides``: dotted config fields applied to the saved config, e.g. {"model.name_or_path": NEW_PATH}."""
    folder = resolve_checkpoint(path)
    method = build_method(checkpoint_config(folder, overrides), folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    method.model.to(device).eval()
    return method
