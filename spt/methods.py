"""What differs between training methods, behind one small interface the trainer and generator use.

``spt`` (and ``pt``, which is SPT with K=1 and no auxiliary losses) train a prompt bank and
retriever on a frozen LM; the checkpoint holds only those tensors.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .batching import EncodedDataset, collate
from .checkpoint import check_shapes, read_checkpoint, resolve_checkpoint, save_trainable
from .config import Config, GenerateConfig
from .format import DialogueFormatter
from .generate import Generation, generate_spt
from .model import SPTModel
from .modeling import load_lm, load_tokenizer

log = logging.getLogger(__name__)


def disable_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def build_lm(cfg: Config):
    """(frozen-ready LM, tokenizer) for ``cfg.model``."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    lm = load_lm(cfg.model.name_or_path, cfg.model.dtype)
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"tokenizer {cfg.model.tokenizer or cfg.model.name_or_path!r} has {len(tokenizer)} tokens "
                         f"but the model's embedding table only {lm.get_input_embeddings().weight.shape[0]}")
    return lm, tokenizer


class SPTMethod:
    """Soft-prompt bank + retriever on a frozen LM (methods ``spt`` and ``pt``)."""

    needs_persona_similarity = True

    def __init__(self, cfg: Config, lm=None, tokenizer=None):
        if lm is None:
            lm, tokenizer = build_lm(cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        disable_dropout(lm)
        if cfg.model.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        text_ids = tokenizer(cfg.spt.prompt_init_text, add_special_tokens=False)["input_ids"] \
            if cfg.spt.prompt_init == "text" else None
        self.model = SPTModel(lm, cfg.spt, text_ids, seed=cfg.train.seed)
        self.model.chunk_size = cfg.train.chunk_size
        if cfg.model.gradient_checkpointing:
            self.model.lm.train()  # HF checkpoints only in train mode; dropout is off anyway
        self.needs_persona_similarity = cfg.spt.lambda_ctr > 0 and cfg.spt.K > 1

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "labels", "query_mask")
        return {k: batch[k].to(device) for k in keys}

    def load_trainable(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        expected = self.model.trainable_state_dict()
        check_shapes(expected, tensors, where, self.cfg.model.name_or_path)
        self.model.load_state_dict(tensors, strict=False)

    def save(self, folder: Path, cfg: Config, trainer_state: dict | None) -> None:
        save_trainable(folder, self.model.trainable_state_dict(), cfg, trainer_state)

    def formatter(self) -> DialogueFormatter:
        return DialogueFormatter(self.tokenizer, self.cfg.data.max_length, self.cfg.data.max_context_turns)

    def generate(self, examples, gen: GenerateConfig, progress: bool = False,
                 score_references: bool = True) -> list[Generation]:
        return generate_spt(self.model, self.tokenizer, self.formatter(), examples, gen,
                            self.cfg.spt.selection_noise, score_references, progress)

    @property
    def num_prompts(self) -> int | None:
        return self.model.K

    @torch.no_grad()
    def evaluate_loss(self, ds: EncodedDataset, batch_size: int, device, autocast) -> dict:
        """Validation loss under the retriever's pick, plus oracle/mean-prompt losses and selection stats."""
        model = self.model
        was_training = model.training
        model.eval()
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))
        sums = {"selected": 0.0, "oracle": 0.0, "mean_prompt": 0.0}
        tokens = hits = n = 0
        hist = torch.zeros(model.K)
        for batch in loader:
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
        loss = sums["selected"] / tokens
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "loss_oracle": sums["oracle"] / tokens,
                "loss_mean_prompt": sums["mean_prompt"] / tokens, "select_acc": hits / n,
                "selection": hist.long().tolist()}


METHODS = {"spt": SPTMethod, "pt": SPTMethod}


def build_method(cfg: Config):
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} is not implemented yet; available: {sorted(METHODS)}")
    return METHODS[cfg.method](cfg)


def load_method(path: str | Path, device: str | None = None):
    """Rebuild a trained method (base model + trained tensors) from a checkpoint or run folder."""
    folder = resolve_checkpoint(path)
    cfg, tensors, _ = read_checkpoint(folder)
    method = build_method(cfg)
    method.load_trainable(tensors, folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    method.model.to(device).eval()
    return method
