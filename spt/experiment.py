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
    data: dict[str, str] = field(default_factory=dict)  # data.* files given with --data: the last word
    bootstrap: int = 1000  # resamples for the comparison's confidence intervals (0: none)


def _resolve(path: str, rel_to: Path) -> Path:
    """A path as given when it exists (or is absolute), else relative to the experiment file; a bare name
    found nowhere is kept as is (a shipped config's name)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return rel_to / p if (rel_to / p).exists() or p.parent != Path(".") else p


SPLIT_KEYS = {"source", "synth", "format", "fractions", "seed"}
# split.synth: the demo's tuning corpus (spt demo): the persona decides the speaking style. These defaults,
# with fractions train=0.8,valid=0.1,test=0.1 and seed 0, give exactly the demo's train/valid/test files.
SYNTH_DEFAULTS = {"dialogues": 1500, "seed": 1}
SPLIT_RECORD = "split.json"  # in output_dir/data: what the split was made from; a change remakes it
DATA_SUFFIXES = (".jsonl", ".txt", ".json", ".csv")  # what spt's readers take (see spt.data.readers)


def _find(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{suffix}" for suffix in DATA_SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
    return found[0] if found else None


def data_option(data: str | Path, split: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Where ``spt experiment --data DATA`` takes the experiment's data from: (the split to make, or None;
    data.* files used as they are).

    A FILE (any supported format) is split by dialogue as the file's ``split`` says (fractions and seed;
    default train=0.8,valid=0.2). A FOLDER with ``train.*`` and ``valid.*`` (and maybe ``test.*``: what
    ``spt data split`` writes), or with PersonaChat's ``train_self_original_no_cands.txt`` and
    ``valid_self_original_no_cands.txt``, is used as it is; a folder with only PersonaChat's
    ``valid_self_original_no_cands.txt`` has that file split."""
    path = Path(data).expanduser()
    spec = {k: v for k, v in (split or {}).items() if k not in ("source", "synth", "format")}
    if path.is_file():
        return {**spec, "source": str(path.resolve())}, {}
    if not path.is_dir():
        raise ConfigError(f"--data {data}: no such file or folder")
    persona_chat = {name: path / f"{name}_self_original_no_cands.txt" for name in ("train", "valid")}
    if all(f.is_file() for f in persona_chat.values()):
        return None, {f"data.{name}": str(f.resolve()) for name, f in persona_chat.items()}
    plain = {name: _find(path, name) for name in ("train", "valid", "test")}
    if plain["train"] and plain["valid"]:
        return None, {f"data.{name}": str(f.resolve()) for name, f in plain.items() if f}
    if persona_chat["valid"].is_file():
        return {**spec, "source": str(persona_chat["valid"].resolve())}, {}
    raise ConfigError(f"--data {data}: no data found in this folder: expected train.* and valid.* files "
                      f"({', '.join(DATA_SUFFIXES)}), or PersonaChat's train_self_original_no_cands.txt and "
                      "valid_self_original_no_cands.txt (or the valid file alone, split by dialogue); or give a file")


def load_experiment(path: str | Path, output_dir: str | None = None,
                    overrides: dict[str, Any] | None = None, data: str | Path | None = None,
                    bootstrap: int | None = None) -> Experiment:
    """Read an experiment file; ``overrides`` (dotted) apply to every arm, after the file's own. ``data``
    replaces the file's data (see :func:`data_option`); ``bootstrap`` sets the comparison's resamples."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"name", "config", "output_dir", "overrides", "arms", "split", "generate", "bootstrap"}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    split = raw.get("split")
    if split is not None:
        if not isinstance(split, dict):
            raise ConfigError(f"{path}: split must be a mapping (source or synth, fractions, seed)")
        if unknown := sorted(set(split) - SPLIT_KEYS):
            raise ConfigError(f"{path}: split: unknown key(s) {unknown}; known: {sorted(SPLIT_KEYS)}")
        if ("source" in split) == ("synth" in split):
            raise ConfigError(f"{path}: split needs either source (a data file) or synth (the demo's synthetic "
                              "corpus), not both")
    data_files: dict[str, str] = {}
    if data is not None:
        split, data_files = data_option(data, split)
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
    resamples = raw.get("bootstrap", 1000) if bootstrap is None else bootstrap
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0:
        raise ConfigError(f"{path}: bootstrap must be a number of resamples >= 0 (0: none), got {resamples!r}")
    return Experiment(
        name=raw.get("name", path.stem), output_dir=Path(output_dir or raw.get("output_dir") or f"runs/{path.stem}"),
        config=_resolve(raw["config"], here) if raw.get("config") else None, overrides=raw.get("overrides") or {},
        arms=arms, split=split, generate=raw.get("generate") or {}, data=data_files, bootstrap=resamples,
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
    """Split the experiment's source (a file, or the demo's synthetic corpus) by dialogue into
    output_dir/data/NAME.jsonl; the data.* overrides that point at them. The split is made once and made
    again whenever its source (contents), fractions or seed change (recorded in data/split.json), so
    finished arms trained on the old split are then found stale."""
    from .data import parse_fractions, read_examples, split_by_dialogue, write_jsonl
    from .data.synth import synth_examples
    from .pipeline import sha256_file

    spec = exp.split
    data_dir = exp.output_dir / "data"
    try:
        fractions = parse_fractions(str(spec.get("fractions", "train=0.8,valid=0.2")))
    except ValueError as e:
        raise ConfigError(f"split.fractions: {e}") from None
    files = {name: data_dir / f"{name}.jsonl" for name in fractions}
    if "synth" in spec:
        if not isinstance(spec["synth"] or {}, dict):
            raise ConfigError(f"split.synth must be a mapping like {SYNTH_DEFAULTS}, got {spec['synth']!r}")
        synth = {**SYNTH_DEFAULTS, **(spec["synth"] or {})}
        if bad := sorted(set(synth) - set(SYNTH_DEFAULTS)):
            raise ConfigError(f"split.synth: unknown key(s) {bad}; known: {sorted(SYNTH_DEFAULTS)}")
        origin: dict[str, Any] = {"synth": synth}
    else:
        source = _resolve(str(spec["source"]), here)
        if not source.is_file():
            raise ConfigError(f"split.source {source}: no such file (spt experiment --data FILE_OR_DIR gives "
                              "the experiment other data)")
        origin = {"source": str(source.resolve()), "sha256": sha256_file(source)}
    record = {**origin, "fractions": fractions, "seed": spec.get("seed", 0), "format": spec.get("format")}
    record_path = data_dir / SPLIT_RECORD
    old = json.loads(record_path.read_text()) if record_path.is_file() else None
    if old != record or not all(f.is_file() for f in files.values()):
        if old is not None and old != record:
            log.warning("[data] the split's source or settings changed: splitting again into %s", data_dir)
        if "synth" in spec:
            examples = synth_examples(int(synth["dialogues"]), seed=int(synth["seed"]), style_consistency=1.0,
                                      clear_majority=True)
        else:
            examples = read_examples(source, spec.get("format"))
        parts = split_by_dialogue(examples, fractions, spec.get("seed", 0))
        data_dir.mkdir(parents=True, exist_ok=True)
        record_path.unlink(missing_ok=True)  # no record while the files are half written
        for name, part in parts.items():
            write_jsonl(part, files[name])
        record_path.write_text(json.dumps(record, indent=1))
    return {f"data.{name}": str(f) for name, f in files.items() if name in ("train", "valid", "test")}


def run_experiment(exp: Experiment, here: Path = Path("."), progress: bool = True,
                   rerun_stale: bool = False, dry_run: bool = False) -> str:
    """Run every unfinished arm; return the comparison table (also written to output_dir/comparison.md,
    with its bootstrap numbers in comparison.json and a plot with error bars in comparison.png).

    Every arm's config is built (and so validated) before any arm runs. Finished arms whose recorded
    settings differ from the file's are refused by name, or rerun with ``rerun_stale``. ``dry_run``: make
    the data split and validate every arm, then return what would run (nothing trains)."""
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
        overrides = {**data_overrides, **exp.overrides, **arm.overrides, **exp.data}
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
    if dry_run:
        return _plan(exp, plans, problems)
    from .pipeline import evaluate_file, generate_file
    from .report import compare_runs, comparison_plot, load_run_metrics
    from .train import RUN_FILES, train

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
    from .bootstrap import load_per_example
    from .report import write_text_atomic

    named, examples = [], []
    for arm in (a for a in exp.arms if a.compare):
        metrics = load_run_metrics(exp.output_dir / arm.name)[1]
        examples.append(load_per_example(exp.output_dir / arm.name, metrics))
        metrics["train_min"] = timings.get(arm.name, {}).get("train_s", float("nan")) / 60
        named.append((arm.name, metrics))
    table, boot = compare_runs(named, examples, exp.bootstrap)
    write_text_atomic(exp.output_dir / "comparison.md", f"# {exp.name}\n\n{table}")
    if boot is not None:
        write_text_atomic(exp.output_dir / "comparison.json", json.dumps(boot.to_json(), indent=1) + "\n")
    comparison_plot(named, exp.output_dir / "comparison.png", f"{exp.name}: {len(named)} runs compared", boot)
    return table


def _plan(exp: Experiment, plans: dict[str, tuple[Config, dict, dict]], problems: list[str]) -> str:
    """What ``run_experiment`` would do (its dry run): the data, and each arm's method, base, steps, status."""
    lines = [f"# {exp.name} (dry run: every arm validated, nothing trained)", "",
             f"Output: {exp.output_dir}", ""]
    cfg0 = next(iter(plans.values()))[0]
    for split in ("train", "valid", "test"):
        path = getattr(cfg0.data, split)
        if path:
            jsonl = Path(path).is_file() and path.endswith(".jsonl")
            count = sum(map(bool, Path(path).read_bytes().split(b"\n"))) if jsonl else None
            lines.append(f"- data.{split}: {path}" + (f" ({count} examples)" if count is not None else ""))
    lines += ["", "| arm | method | base model | steps | status |", "|---|---|---|---:|---|"]
    stale = {p.split(":")[0].removesuffix(" (generation only)") for p in problems}
    for arm in exp.arms:
        cfg = plans[arm.name][0]
        arm_dir = exp.output_dir / arm.name
        status = ("stale" if arm.name in stale else "finished" if (arm_dir / "eval" / "metrics.json").is_file()
                  else "in progress" if (arm_dir / "checkpoint-last").is_dir() else "to run")
        base = f"arm {arm.base_model_from}" if arm.base_model_from else (
            "from scratch" if cfg.model.init == "scratch" else cfg.model.name_or_path)
        steps = "–" if cfg.method == "textual" else cfg.train.max_steps
        lines.append(f"| {arm.name} | {cfg.method}{'' if arm.compare else ' (not compared)'} | {base} | {steps} "
                     f"| {status} |")
    if problems:
        lines += ["", "Stale (finished with other settings; --rerun-stale reruns them): " + "; ".join(problems)]
    return "\n".join(lines) + "\n"
