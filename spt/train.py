"""The training loop, built on accelerate: one code path for CPU, one GPU or many (``accelerate launch``).

AdamW, warmup + schedule, gradient accumulation and clipping, mixed precision, seeded, tqdm progress
with every loss component, validation every N steps or epoch, best and last checkpoints (atomic),
resume from the last one, non-finite losses skipped and counted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .batching import EncodedDataset, LengthGroupedBatches, PersonaSimilarity, collate
from .checkpoint import checkpoint_config, has_trainer_state, read_trainer_state, resolve_checkpoint
from .config import Config, changed_settings, flatten, resolve_paths, show_change
from .data import read_examples
from .distributed import ShardedBatches
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


# Files a training run writes into its folder (``--overwrite`` removes exactly these).
RUN_FILES = ("checkpoint-last", "checkpoint-best", "metrics.csv", "tb", "train_summary.json", "config.yaml",
             "predictions.jsonl", "eval")
# Fields that may change when a run is resumed; they are applied (and recorded in config.yaml). Any other
# change (model, data, batch size, seed, prompt bank...) would make the resumed run a different run.
RESUMABLE = {"model.name_or_path", "model.tokenizer", "data.valid", "data.test", "data.max_valid_examples",
             "train.lr", "train.weight_decay", "train.epochs", "train.max_steps", "train.warmup_steps",
             "train.scheduler", "train.max_grad_norm", "train.eval_every", "train.log_every",
             "train.max_bad_steps", "train.eval_batch_size", "train.mixed_precision", "train.chunk_size",
             "spt.retriever_lr",
             "spt.lambda_llm", "spt.lambda_sel", "spt.lambda_fus", "spt.lambda_ctr", "spt.lambda_bal",
             "spt.tau_gold", "spt.tau_sim", "spt.sel_noise_sigma", "spt.selection_noise", "spt.ctr_bleu_threshold"}
RESUMABLE_SECTIONS = ("generate.", "eval.", "serve.")


def check_resume_changes(saved: Config, cfg: Config, ckpt: Path) -> list[str]:
    """The fields ``cfg`` changes from the checkpoint's config; raise if any of them cannot change on resume."""
    old, new = flatten(saved.to_dict()), flatten(cfg.to_dict())
    changed = changed_settings(old, new)
    fixed = [k for k in changed if k not in RESUMABLE and not k.startswith(RESUMABLE_SECTIONS)]
    if "spt.retriever_lr" in changed and (old.get("spt.retriever_lr") is None) != (new.get("spt.retriever_lr") is None):
        fixed.append("spt.retriever_lr (between null and a value: it changes the optimizer's parameter groups)")
    if fixed:
        shown = ", ".join(k if " " in k else show_change(k, old, new) for k in fixed)
        raise ValueError(f"cannot change on resume from {ckpt}: {shown}; start a new run (another --output-dir) "
                         f"to change them")
    if changed:
        log.info("resuming with changed %s", ", ".join(f"{k}={new.get(k)!r}" for k in changed))
    return changed


def apply_optimizer_settings(optimizer, scheduler, cfg: Config, groups: list[dict]) -> None:
    """After loading a resumed optimizer and scheduler: use this config's lr and weight decay (the loaded
    state holds the old ones), with the schedule's factor at the current step. Unchanged settings give
    exactly the values the loaded state had."""
    sched = getattr(scheduler, "scheduler", scheduler)
    lrs = [g.get("lr", cfg.train.lr) for g in groups]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["initial_lr"] = lr
        group["weight_decay"] = cfg.train.weight_decay
    sched.base_lrs = lrs
    lambdas = getattr(sched, "lr_lambdas", None)
    if lambdas:
        for group, base, factor in zip(optimizer.param_groups, lrs, lambdas, strict=True):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_run_dir(output_dir: Path) -> None:
    """Undo what a crash while writing a checkpoint left in ``output_dir``: half-written ``.NAME.tmp-PID``
    folders are removed; a ``.NAME.old-PID`` whose new version never arrived is put back as ``NAME``."""
    if not output_dir.is_dir():
        return
    for path in sorted(output_dir.glob(".*.tmp-*")) + sorted(output_dir.glob(".*.old-*")):
        name, _, pid = path.name[1:].rpartition("-")
        name = name.rsplit(".", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue  # another live process's write (or not ours at all)
        target = output_dir / name
        if ".old-" in path.name and not target.exists():
            path.rename(target)
            log.warning("restored %s from an interrupted checkpoint write", target)
        else:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an interrupted checkpoint write", path)


def prepare_run_dir(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Before anything is loaded: the run folder must be a writable folder, and a folder that already holds
    a run is continued only with ``--resume`` and replaced only with ``--overwrite``."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output folder {output_dir} is a file, not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    probe = output_dir / f".spt-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"\0" * 65536)
    except OSError as e:
        raise ValueError(f"output folder {output_dir} is not writable: {e.strerror or e}") from None
    finally:
        probe.unlink(missing_ok=True)
    recover_run_dir(output_dir)
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    if resuming or not existing:
        return
    if not overwrite:
        raise ValueError(f"{output_dir} already holds a run ({', '.join(existing)}): continue it with "
                         f"`spt train --resume {output_dir}`, or pass --overwrite to replace it")
    for name in existing:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    log.warning("--overwrite: removed %s from %s", ", ".join(existing), output_dir)


def truncate_metrics(output_dir: Path, step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint's step (they will be logged again)."""
    import csv

    path = output_dir / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    keep = [r for r in rows[1:] if not (r and r[0].isdigit() and int(r[0]) > step)]
    if len(keep) == len(rows) - 1:
        return
    tmp = path.with_name(f".metrics.csv.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows(rows[:1] + keep)
    tmp.replace(path)
    log.info("metrics.csv: dropped %d row(s) logged after step %d", len(rows) - 1 - len(keep), step)


class StopRequest:
    """Set by the first Ctrl-C: training stops at the next step boundary and saves checkpoint-last there."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def deferred_interrupt() -> Iterator[StopRequest]:
    """The first SIGINT only asks the loop to stop after the step in progress (so the saved state is
    exactly an uninterrupted run's at that step); a second one interrupts at once, saving nothing."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame) -> None:
        if stop.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.requested = True
        log.warning("interrupt: stopping after the current step and saving checkpoint-last "
                    "(interrupt again to stop at once without saving)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


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
          progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train ``cfg.method`` and write checkpoints under ``output_dir``; resume from a run folder.

    A folder that already holds a run is refused unless ``resume`` continues it or ``overwrite`` replaces it.
    On resume, ``cfg`` may change only the ``RESUMABLE`` fields of the checkpoint's config. A run that fails
    before writing anything (bad model, data or lengths) leaves no folder behind.
    """
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    try:
        return _train(cfg, output_dir, resume, progress, overwrite)
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def _train(cfg: Config, output_dir: Path, resume: str | Path | None, progress: bool,
           overwrite: bool) -> TrainResult:
    from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler

    start = time.time()
    cfg = resolve_paths(cfg)  # config.yaml names data and model by absolute path: usable from any folder
    rank, world, _ = distributed.init_from_launcher()  # several processes (accelerate launch, torchrun)
    main = rank == 0
    state, ckpt = None, None
    if resume is not None:
        if main:
            recover_run_dir(Path(resume))
        distributed.barrier()
        ckpt = resolve_checkpoint(resume, prefer="checkpoint-last")
        if not has_trainer_state(ckpt):
            raise FileNotFoundError(f"{ckpt} has no trainer state; only checkpoint-last can be resumed")
        check_resume_changes(resolve_paths(checkpoint_config(ckpt)), cfg, ckpt)
        state = read_trainer_state(ckpt)
    same_run = ckpt is not None and output_dir.resolve() == ckpt.parent.resolve()
    if main:  # one process checks and prepares the folder; the others wait for it (and for its verdict)
        error = None
        try:
            prepare_run_dir(output_dir, resuming=same_run, overwrite=overwrite)
        except (OSError, ValueError) as e:
            error = e
        distributed.broadcast_object(repr(error) if error else None)
        if error:
            raise error
    elif problem := distributed.broadcast_object(None):
        raise RuntimeError(f"rank 0 could not prepare {output_dir}: {problem}")
    if not cfg.data.train:
        raise ValueError("data.train is not set: pass --data.train=FILE or a config that names it")
    seed_everything(cfg.train.seed)
    # One process may train several runs (experiments, tests) with different precisions: reset the
    # per-run accelerate state, keeping the distributed (process group) part.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                              gradient_accumulation_steps=cfg.train.grad_accum, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=not uses_every_parameter(cfg))])
    method = build_method(cfg, ckpt)
    if world > 1 and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) \
            and cfg.method not in ("spt", "pt"):
        raise ValueError(f"{accelerator.distributed_type.value} is supported for spt and pt only; train "
                         f"{cfg.method} with DDP (configs/accelerate/ddp.yaml)")
    if not method.trains:
        return _no_training(method, cfg, output_dir, accelerator, start)
    formatter = method.formatter()
    train_ds = load_split(cfg, "train", formatter, cfg.data.max_train_examples)
    valid_ds = load_split(cfg, "valid", formatter, cfg.data.max_valid_examples)
    if ckpt is None:
        method.prepare(train_ds)
    sampler = LengthGroupedBatches(train_ds.lengths(), cfg.train.batch_size, cfg.train.seed,
                                   group=cfg.train.group_by_length)
    if world > 1:  # train.batch_size is the global batch: each rank takes every world-th row of it
        if cfg.train.batch_size < world:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be at least "
                             f"the number of processes ({world})")
        sampler = ShardedBatches(sampler, rank, world)
        log.info("%d processes: %d rows of each batch of %d per process", world,
                 math.ceil(cfg.train.batch_size / world), cfg.train.batch_size)
    pad_id = method.tokenizer.pad_token_id
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id))
    similarity = PersonaSimilarity(train_ds.personas) if method.needs_persona_similarity else None

    params = [p for p in method.model.parameters() if p.requires_grad]
    groups = param_groups(method.model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.train.grad_accum))
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, cfg.train.warmup_steps, total_steps)
    # The scheduler is not prepared: accelerate would step it once per process per step, since it assumes
    # per-process batches; spt's train.batch_size is the global batch and a step is a global step.
    model, optimizer = accelerator.prepare(method.model, optimizer)
    step, epoch, batch_in_epoch, best = 0, 0, 0, None
    history: list[dict] = []
    replicated = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(optimizer, scheduler, cfg, groups)
        step, epoch, batch_in_epoch, best = state["step"], state["epoch"], state["batch_in_epoch"], state["best"]
        history = state.get("history", [])
        method.load_training_state(state.get("method", {}))
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, batch_in_epoch)

    if main:
        cfg.save(output_dir / "config.yaml")  # what runs, including the fields a resume changed
        if state is not None:
            truncate_metrics(output_dir, step)
    metrics = MetricLogger(output_dir) if main else None

    def save(name: str, with_state: bool) -> None:
        gathered = {}
        if replicated:  # DDP keeps whole replicas: check they still agree
            distributed.assert_same({n: p.detach() for n, p in method.model.named_parameters() if p.requires_grad},
                                    f"trainable parameters at step {step}")
        elif world > 1:  # FSDP / DeepSpeed shard the parameters: every rank takes part in gathering them
            full = accelerator.get_state_dict(model)
            gathered = {"tensors": {k: v for k, v in full.items() if not k.startswith("lm.")}}
        if not main:
            return
        trainer_state = None
        if with_state:
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best,
                             "rng": rng_state(), "history": history, "method": method.training_state()}
        method.save(output_dir / name, cfg, trainer_state, **gathered)

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
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not progress or not main,
               dynamic_ncols=True)
    eval_every = cfg.train.eval_every or steps_per_epoch

    def stop_if_asked() -> None:
        # at a step boundary, on every rank at once: the saved state is exactly an uninterrupted run's
        if distributed.any_rank(stop.requested):
            save("checkpoint-last", with_state=True)
            log.warning("stopped at step %d; resume with: spt train --resume %s", step, output_dir)
            raise KeyboardInterrupt

    with deferred_interrupt() as stop:
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
                        finite, scale = sync_step(out["loss"], method.loss_tokens(batch), world)
                        if finite:
                            bad_in_a_row = 0
                            accelerator.backward(out["loss"] * scale if world > 1 else out["loss"])
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
                            raise TooManyBadSteps(f"{bad_in_a_row} non-finite losses in a row "
                                                  f"(train.max_bad_steps); {last_checkpoint(output_dir)}")
                        if cfg.train.grad_accum == 1:
                            stop_if_asked()
                        continue
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    bar.update(1)
                    comps = {k: float(v.detach()) for k, v in out.items() if v.dim() == 0}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in comps.items()}, refresh=False)
                    if step % cfg.train.log_every == 0 or step == 1:
                        comps = distributed.mean_across(comps)  # logged: the mean over ranks
                    comps["lr"] = scheduler.get_last_lr()[0]
                    if metrics and (step % cfg.train.log_every == 0 or step == 1):
                        metrics.log(step, "train", comps)
                        if not progress:  # no bar: a line now and then, so a long run is not silent
                            log.info("step %d/%d: %s", step, total_steps,
                                     " ".join(f"{k} {v:.4g}" for k, v in comps.items()))
                    if step % eval_every == 0 or step == total_steps:
                        validate()
                        save("checkpoint-last", with_state=True)
                    if step >= total_steps:
                        break
                    stop_if_asked()
                else:
                    epoch, batch_in_epoch = epoch + 1, 0
        except KeyboardInterrupt:
            if not stop.requested:
                log.warning("interrupted at step %d without saving; %s", step, last_checkpoint(output_dir))
            raise
        finally:
            bar.close()
            if metrics:
                metrics.close()
    result = TrainResult(output_dir, step, best, history, time.time() - start)
    distributed.barrier()  # the last checkpoint is on disk before any rank returns
    if main:
        summary = {"step": step, "best_val_loss": best, "seconds": round(result.seconds, 2), "history": history}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return result


def sync_step(loss: torch.Tensor, tokens: int, world: int) -> tuple[bool, float]:
    """(whether every rank's loss is finite, this rank's loss scale), agreed by all ranks in one all-reduce.

    Every rank skips a step if any rank's loss is not finite (one rank stepping alone would deadlock).
    The scale makes data parallelism match one process on the same global batch: DDP averages the
    ranks' gradients, while one process averages over every response token of the batch, so a rank's
    (per-token mean) loss is weighted by its share of the batch's response tokens: tokens_r * world / tokens."""
    bad = 0.0 if bool(torch.isfinite(loss).item()) else 1.0
    if world == 1:
        return bad == 0.0, 1.0
    total_tokens, total_bad = distributed.sum_across([float(tokens), bad])
    return total_bad == 0.0, tokens * world / max(total_tokens, 1.0)


def uses_every_parameter(cfg: Config) -> bool:
    """Whether every trainable parameter gets a gradient at every step (DDP then skips a graph walk).

    SPT with K > 1 and the selection loss trains prompts and retriever every step; PT's retriever (K = 1)
    gets none, and the baselines are left to DDP's check to be safe."""
    return cfg.method == "spt" and cfg.spt.K > 1 and cfg.spt.lambda_sel > 0


def last_checkpoint(output_dir: Path) -> str:
    """Where a stopped run can resume from, in words."""
    if has_trainer_state(output_dir / "checkpoint-last"):
        return f"last good checkpoint: {output_dir / 'checkpoint-last'}"
    return "no checkpoint was saved yet (nothing to resume; start again)"


def _no_training(method, cfg: Config, output_dir: Path, accelerator, start: float) -> TrainResult:
    """Methods that do not train (textual): record the validation loss and a config-only checkpoint."""
    main = accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(output_dir / "config.yaml")
    history = []
    valid_ds = load_split(cfg, "valid", method.formatter(), cfg.data.max_valid_examples)
    method.model.to(accelerator.device)
    if valid_ds is not None:
        result = method.evaluate_loss(valid_ds, cfg.train.eval_batch_size, accelerator.device, accelerator.autocast)
        history.append({**result, "step": 0})
        log.info("%s does not train; valid loss %.4f", cfg.method, result["loss"])
    best = history[0]["loss"] if history else None
    result = TrainResult(output_dir, 0, best, history, time.time() - start)
    if main:
        method.save(output_dir / "checkpoint-best", cfg, None)
        (output_dir / "train_summary.json").write_text(json.dumps(
            {"step": 0, "best_val_loss": best, "seconds": round(result.seconds, 2), "history": history}, indent=2))
    distributed.barrier()
    return result
