"""The training loop, built on accelerate: one code path for CPU, one GPU or many (``accelerate launch``).

AdamW, warmup + schedule, gradient accumulation and clipping, mixed precision, seeded, tqdm progress
with every loss component, validation every N steps or epoch, best and last checkpoints (atomic),
resume from the last one, non-finite losses skipped and counted.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .batching import EncodedDataset, LengthGroupedBatches, PersonaSimilarity, collate
from .checkpoint import TRAINER_STATE, resolve_checkpoint
from .config import Config
from .data import read_examples
from .format import DialogueFormatter
from .logger import MetricLogger
from .methods import build_method

log = logging.getLogger(__name__)


class TooManyBadSteps(RuntimeError):
    pass


def resolve_mixed_precision(requested: str) -> str:
    """'auto' -> bf16 on GPUs and CPUs that support it, fp16 on older GPUs, else 'no'."""
    if requested != "auto":
        if requested == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on a CPU")
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if cpu_bf16 else "no"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Trainable parameters; the retriever's in a group of their own when spt.retriever_lr is set."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    retriever = [p for n, p in named if n.startswith("retriever.")]
    if cfg.method not in ("spt", "pt") or cfg.spt.retriever_lr is None or not retriever:
        return [{"params": [p for _, p in named]}]
    return [{"params": [p for n, p in named if not n.startswith("retriever.")]},
            {"params": retriever, "lr": cfg.spt.retriever_lr}]


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    best_val_loss: float | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def load_split(cfg: Config, split: str, formatter: DialogueFormatter, limit: int | None) -> EncodedDataset | None:
    path = getattr(cfg.data, split)
    if not path:
        return None
    examples = read_examples(path, cfg.data.format, cfg.data.strict)
    return EncodedDataset(examples[:limit] if limit else examples, formatter)


def train(cfg: Config, output_dir: str | Path, resume: str | Path | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``cfg.method`` and write checkpoints under ``output_dir``; resume from a run folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler

    start = time.time()
    output_dir = Path(output_dir)
    state, ckpt = None, None
    if resume is not None:
        ckpt = resolve_checkpoint(resume, prefer="checkpoint-last")
        if not (ckpt / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"{ckpt} has no {TRAINER_STATE}; only checkpoint-last can be resumed")
        state = torch.load(ckpt / TRAINER_STATE, weights_only=False)
    if not cfg.data.train:
        raise ValueError("data.train is not set: pass --data.train=FILE or a config that names it")
    seed_everything(cfg.train.seed)
    # One process may train several runs (experiments, tests) with different precisions: reset the
    # per-run accelerate state, keeping the distributed (process group) part.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                              gradient_accumulation_steps=cfg.train.grad_accum, cpu=not torch.cuda.is_available())
    method = build_method(cfg, ckpt)
    if not method.trains:
        return _no_training(method, cfg, output_dir, accelerator, start)
    formatter = method.formatter()
    train_ds = load_split(cfg, "train", formatter, cfg.data.max_train_examples)
    valid_ds = load_split(cfg, "valid", formatter, cfg.data.max_valid_examples)
    if ckpt is None:
        method.prepare(train_ds)
    sampler = LengthGroupedBatches(train_ds.lengths(), cfg.train.batch_size, cfg.train.seed,
                                   group=cfg.train.group_by_length)
    pad_id = method.tokenizer.pad_token_id
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id))
    similarity = PersonaSimilarity(train_ds.personas) if method.needs_persona_similarity else None

    params = [p for p in method.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(method.model, cfg), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.train.grad_accum))
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, cfg.train.warmup_steps, total_steps)
    model, optimizer, scheduler = accelerator.prepare(method.model, optimizer, scheduler)
    step, epoch, batch_in_epoch, best = 0, 0, 0, None
    history: list[dict] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch, best = state["step"], state["epoch"], state["batch_in_epoch"], state["best"]
        history = state.get("history", [])
        method.load_training_state(state.get("method", {}))
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, batch_in_epoch)

    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(output_dir / "config.yaml")
    metrics = MetricLogger(output_dir) if accelerator.is_main_process else None

    def save(name: str, with_state: bool) -> None:
        if not accelerator.is_main_process:
            return
        trainer_state = None
        if with_state:
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best,
                             "rng": rng_state(), "history": history, "method": method.training_state()}
        method.save(output_dir / name, cfg, trainer_state)

    def validate() -> None:
        nonlocal best
        if valid_ds is None:
            return
        result = method.evaluate_loss(valid_ds, cfg.train.eval_batch_size, accelerator.device, accelerator.autocast)
        result["step"] = step
        history.append(result)
        if metrics:
            metrics.log(step, "valid", {k: v for k, v in result.items() if isinstance(v, float)})
        log.info("step %d: valid %s", step, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                         for k, v in result.items()}))
        if best is None or result["loss"] < best:
            best = result["loss"]
            save("checkpoint-best", with_state=False)

    bad_in_a_row = 0
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not progress or not accelerator.is_main_process,
               dynamic_ncols=True)
    eval_every = cfg.train.eval_every or steps_per_epoch
    try:
        if state is None:
            validate()  # step 0: the untrained prompts' loss, the baseline every later value compares to
        while step < total_steps:
            sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
            for batch in batches:
                batch_in_epoch += 1
                sim = similarity.matrix(batch["persona_ids"]) if similarity is not None else None
                with accelerator.accumulate(model):
                    with accelerator.autocast():  # the forward only; backward runs outside autocast
                        out = model(**method.model_inputs(batch, accelerator.device), persona_sim=sim)
                    finite = bool(torch.isfinite(out["loss"]).item())
                    if finite:
                        bad_in_a_row = 0
                        accelerator.backward(out["loss"])
                        if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                    optimizer.zero_grad()
                if not finite:
                    bad_in_a_row += 1
                    log.warning("non-finite loss at step %d (%d in a row); step skipped", step, bad_in_a_row)
                    if metrics:
                        metrics.log(step, "train", {"skipped_nonfinite": 1.0})
                    if bad_in_a_row >= cfg.train.max_bad_steps:
                        raise TooManyBadSteps(f"{bad_in_a_row} non-finite losses in a row (train.max_bad_steps); "
                                              f"last good checkpoint: {output_dir / 'checkpoint-last'}")
                    continue
                if not accelerator.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                comps = {k: float(v.detach()) for k, v in out.items() if v.dim() == 0}
                comps["lr"] = scheduler.get_last_lr()[0]
                bar.set_postfix({k: f"{v:.3g}" for k, v in comps.items()}, refresh=False)
                if metrics and (step % cfg.train.log_every == 0 or step == 1):
                    metrics.log(step, "train", comps)
                if step % eval_every == 0 or step == total_steps:
                    validate()
                    save("checkpoint-last", with_state=True)
                if step >= total_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    except KeyboardInterrupt:
        save("checkpoint-last", with_state=True)  # atomic: the previous checkpoint survives a second Ctrl-C
        log.warning("interrupted at step %d; resume with: spt train --resume %s", step, output_dir)
        raise
    finally:
        bar.close()
        if metrics:
            metrics.close()
    result = TrainResult(output_dir, step, best, history, time.time() - start)
    if accelerator.is_main_process:
        summary = {"step": step, "best_val_loss": best, "seconds": round(result.seconds, 2), "history": history}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _no_training(method, cfg: Config, output_dir: Path, accelerator, start: float) -> TrainResult:
    """Methods that do not train (textual): record the validation loss and a config-only checkpoint."""
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(output_dir / "config.yaml")
    history = []
    valid_ds = load_split(cfg, "valid", method.formatter(), cfg.data.max_valid_examples)
    method.model.to(accelerator.device)
    if valid_ds is not None:
        result = method.evaluate_loss(valid_ds, cfg.train.eval_batch_size, accelerator.device, accelerator.autocast)
        history.append({**result, "step": 0})
        log.info("%s does not train; valid loss %.4f", cfg.method, result["loss"])
    method.save(output_dir / "checkpoint-best", cfg, None)
    best = history[0]["loss"] if history else None
    result = TrainResult(output_dir, 0, best, history, time.time() - start)
    (output_dir / "train_summary.json").write_text(json.dumps(
        {"step": 0, "best_val_loss": best, "seconds": round(result.seconds, 2), "history": history}, indent=2))
    return result
