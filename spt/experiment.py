"""``spt experiment``: run a list of arms (train -> generate -> eval each), skip what is finished, compare.

An experiment file:

    name: paper-opt125m
    config: configs/spt-opt125m-convai2.yaml   # base config for every arm
    output_dir: runs/paper-opt125m
    split:                                       # optional: split one file by dialogue first
      source: valid_self_original_no_cands.txt
      fractions: train=0.8,valid=0.2
    overrides: {train.max_steps: 100}            # dotted overrides for every arm
    generate: {limit: 500}                       # optional: data, limit, and generate.* options
    arms:
      - {name: pt, overrides: {method: pt}}
      - {name: spt}
      - {name: base-lm, overrides: {...}, compare: false}
      - {name: spt-on-base, base_model_from: base-lm}   # model.name_or_path = that arm's best checkpoint

Each arm gets a folder under ``output_dir``; an arm interrupted mid-training resumes from its last
checkpoint. A finished arm (``eval/metrics.json``) is skipped only while what produced it is unchanged:
``arm.json`` records its resolved training config with the hashes of its data files (and of the arm its
base model came from), and its generation settings. When they differ the experiment stops before running
anything and names the arms and fields; ``rerun_stale`` retrains (or only regenerates) those arms.
Dotted overrides given to ``spt experiment`` apply to every arm, after the file's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, changed_settings, flatten, load_config, show_change

log = logging.getLogger(__name__)


@dataclass
class Arm:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    base_model_from: str | None = None
    compare: bool = True


@dataclass
class Experiment:
    name: str
    output_dir: Path
    config: Path | None
    overrides: dict[str, Any]
    arms: list[Arm]
    split: dict[str, Any] | None = None
    generate: dict[str, Any] = field(default_factory=dict)


def _resolve(path: str, rel_to: Path) -> Path:
    """A path as given when it exists (or is absolute), else relative to the experiment file; a bare name
    found nowhere is kept as is (a shipped config's name)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return rel_to / p if (rel_to / p).exists() or p.parent != Path(".") else p


def load_experiment(path: str | Path, output_dir: str | None = None,
                    overrides: dict[str, Any] | None = None) -> Experiment:
    """Read an experiment file; ``overrides`` (dotted) apply to every arm, after the file's own."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"name", "config", "output_dir", "overrides", "arms", "split", "generate"}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    if not raw.get("arms"):
        raise ConfigError(f"{path}: 'arms' must list at least one arm")
    arms = []
    for i, a in enumerate(raw["arms"]):
        if not isinstance(a, dict) or "name" not in a:
            raise ConfigError(f"{path}: arms[{i}] needs a name")
        bad = sorted(set(a) - {"name", "overrides", "base_model_from", "compare"})
        if bad:
            raise ConfigError(f"{path}: arms[{i}] ({a['name']}): unknown key(s) {bad}")
        arms.append(Arm(a["name"], a.get("overrides") or {}, a.get("base_model_from"), a.get("compare", True)))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: arm names must be unique, got {names}")
    for a in arms:
        if a.base_model_from is not None and a.base_model_from not in names[: names.index(a.name)]:
            raise ConfigError(f"{path}: arm {a.name}: base_model_from {a.base_model_from!r} must name an earlier arm")
    here = path.parent
    if overrides:
        for a in arms:  # the command line has the last word, in every arm
            a.overrides = {**a.overrides, **overrides}
    return Experiment(
        name=raw.get("name", path.stem), output_dir=Path(output_dir or raw.get("output_dir") or f"runs/{path.stem}"),
        config=_resolve(raw["config"], here) if raw.get("config") else None, overrides=raw.get("overrides") or {},
        arms=arms, split=raw.get("split"), generate=raw.get("generate") or {},
    )


ARM_RECORD = "arm.json"
_NOT_TRAINING = ("generate.", "eval.", "serve.")


def _file_hash(path: str | None, cache: dict[str, str]) -> str | None:
    if not path or not Path(path).is_file():
        return None
    if path not in cache:
        from .pipeline import sha256_file

        cache[path] = sha256_file(path)[:16]
    return cache[path]


def _train_record(cfg: Config, base_record: dict | None, cache: dict[str, str]) -> dict[str, Any]:
    """What an arm's training depends on: its resolved config (not generation), data contents, base arm."""
    record = {k: v for k, v in flatten(cfg.to_dict()).items() if not k.startswith(_NOT_TRAINING)}
    for split in ("train", "valid"):
        record[f"hash(data.{split})"] = _file_hash(getattr(cfg.data, split), cache)
    if base_record is not None:  # its base model is another arm's checkpoint: retrained, it is another model
        record["model.name_or_path"] = "(base arm) " + hashlib.sha256(
            json.dumps(base_record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return record


def _generate_record(cfg: Config, gen_data: str | None, limit: int | None, cache: dict[str, str]) -> dict[str, Any]:
    data = gen_data or cfg.data.test or cfg.data.valid
    return {**{k: v for k, v in flatten(cfg.to_dict()).items() if k.startswith("generate.")},
            "data": data, "hash(data)": _file_hash(data, cache), "limit": limit}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [show_change(k, old, new) for k in changed_settings(old, new)]


def _prepare_split(exp: Experiment, here: Path) -> dict[str, str]:
    from .data import parse_fractions, read_examples, split_by_dialogue, write_jsonl

    spec = exp.split
    data_dir = exp.output_dir / "data"
    fractions = parse_fractions(spec.get("fractions", "train=0.8,valid=0.2"))
    files = {name: data_dir / f"{name}.jsonl" for name in fractions}
    if not all(f.is_file() for f in files.values()):
        source = _resolve(spec["source"], here)
        parts = split_by_dialogue(read_examples(source, spec.get("format")), fractions, spec.get("seed", 0))
        for name, part in parts.items():
            write_jsonl(part, files[name])
    return {f"data.{name}": str(f) for name, f in files.items() if name in ("train", "valid", "test")}


def run_experiment(exp: Experiment, here: Path = Path("."), progress: bool = True,
                   rerun_stale: bool = False) -> str:
    """Run every unfinished arm; return the comparison table (also written to output_dir/comparison.md).

    Every arm's config is built (and so validated) before any arm runs. Finished arms whose recorded
    settings differ from the file's are refused by name, or rerun with ``rerun_stale``."""
    from .pipeline import evaluate_file, generate_file
    from .report import compare, comparison_plot, load_run_metrics
    from .train import RUN_FILES, train

    exp.output_dir.mkdir(parents=True, exist_ok=True)
    data_overrides = _prepare_split(exp, here) if exp.split else {}
    timings_path = exp.output_dir / "timings.json"
    timings: dict[str, dict[str, float]] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    gen = dict(exp.generate)
    gen_data, limit = gen.pop("data", None), gen.pop("limit", None)
    gen_overrides = {k if k.startswith("generate.") else f"generate.{k}": v for k, v in gen.items()}

    cache: dict[str, str] = {}
    plans: dict[str, tuple[Config, dict, dict]] = {}
    for arm in exp.arms:  # validate every arm before running any
        overrides = {**data_overrides, **exp.overrides, **arm.overrides}
        if arm.base_model_from:
            overrides["model.name_or_path"] = str(exp.output_dir / arm.base_model_from / "checkpoint-best")
        try:
            cfg = load_config(exp.config, {**overrides, **gen_overrides})
        except ConfigError as e:
            raise ConfigError(f"arm {arm.name}: {e}") from None
        base = plans[arm.base_model_from][1] if arm.base_model_from else None
        plans[arm.name] = (cfg, _train_record(cfg, base, cache), _generate_record(cfg, gen_data, limit, cache))

    stale_train, stale_gen, problems = set(), set(), []
    for arm in exp.arms:
        arm_dir = exp.output_dir / arm.name
        path = arm_dir / ARM_RECORD
        if not (arm_dir / "train_summary.json").is_file():
            continue
        if not path.is_file():
            log.warning("[%s] has no %s (made by an older spt): its settings cannot be checked; delete %s "
                        "to rerun it", arm.name, ARM_RECORD, arm_dir)
            continue
        record = json.loads(path.read_text())
        _, train_rec, gen_rec = plans[arm.name]
        if arm.base_model_from in stale_train or (changed := _changes(record.get("train", {}), train_rec)):
            stale_train.add(arm.name)
            problems.append(f"{arm.name}: " + (", ".join(changed[:6]) if arm.base_model_from not in stale_train
                                                 else f"its base arm {arm.base_model_from} is rerun"))
        elif arm.compare and "generate" in record and (changed := _changes(record["generate"], gen_rec)):
            stale_gen.add(arm.name)
            problems.append(f"{arm.name} (generation only): " + ", ".join(changed[:6]))
    if problems and not rerun_stale:
        raise ConfigError("finished arms were made with other settings: " + "; ".join(problems)
                          + ". Rerun them with --rerun-stale, or use another --output-dir")
    for name in stale_train | stale_gen:
        arm_dir = exp.output_dir / name
        doomed = (*RUN_FILES, ARM_RECORD) if name in stale_train else ("predictions.jsonl", "eval")
        for item in doomed:
            target = arm_dir / item
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        log.warning("[%s] stale: %s", name, "retraining" if name in stale_train else "regenerating")

    for arm in exp.arms:
        arm_dir = exp.output_dir / arm.name
        cfg, train_rec, gen_rec = plans[arm.name]
        if (arm_dir / "eval" / "metrics.json").is_file():
            log.info("[%s] already finished; skipped", arm.name)
            continue
        t = timings.setdefault(arm.name, {})
        if not (arm_dir / "train_summary.json").is_file():
            resume = arm_dir if (arm_dir / "checkpoint-last").is_dir() else None
            log.info("[%s] training (%s)%s", arm.name, cfg.method, " — resuming" if resume else "")
            start = time.time()
            # the experiment owns its arm folders: an arm that never reached a checkpoint starts afresh
            train(cfg, arm_dir, resume=resume, progress=progress, overwrite=resume is None)
            t["train_s"] = time.time() - start
        record = {"train": train_rec}
        (arm_dir / ARM_RECORD).write_text(json.dumps(record, indent=1, default=str))
        if arm.compare:
            start = time.time()
            arm_gen = {k.removeprefix("generate."): v for k, v in gen_rec.items() if k.startswith("generate.")}
            generate_file(arm_dir, gen_data, limit=limit, gen_overrides=arm_gen, progress=progress)
            t["generate_s"] = time.time() - start
            start = time.time()
            evaluate_file(arm_dir)
            t["eval_s"] = time.time() - start
            record["generate"] = gen_rec
            (arm_dir / ARM_RECORD).write_text(json.dumps(record, indent=1, default=str))
        else:
            (arm_dir / "eval").mkdir(parents=True, exist_ok=True)
            (arm_dir / "eval" / "metrics.json").write_text(json.dumps({"n": 0, "note": "not compared"}))
        timings_path.write_text(json.dumps(timings, indent=2))
    named = []
    for arm in (a for a in exp.arms if a.compare):
        metrics = load_run_metrics(exp.output_dir / arm.name)[1]
        metrics["train_min"] = timings.get(arm.name, {}).get("train_s", float("nan")) / 60
        named.append((arm.name, metrics))
    table = compare(named)
    (exp.output_dir / "comparison.md").write_text(f"# {exp.name}\n\n{table}")
    comparison_plot(named, exp.output_dir / "comparison.png", f"{exp.name}: {len(named)} runs compared")
    return table
