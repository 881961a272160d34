"""The ``spt`` command. Each subcommand is a plain function; its docstring is its ``--help``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .data import (
    FORMATS,
    DataError,
    ReadReport,
    parse_fractions,
    read_examples,
    split_by_dialogue,
    write_jsonl,
)

log = logging.getLogger("spt")


# --- spt data ------------------------------------------------------------------------------------

def data_stats(args: argparse.Namespace) -> int:
    """Counts (dialogues, examples, persona sentences) and length percentiles of a data file.

    With --tokenizer, lengths are tokens of the formatted training input; otherwise words.
    """
    from .stats import dataset_stats

    report = ReadReport()
    examples = read_examples(args.file, args.data_format, args.strict, report)
    stats = dataset_stats(examples, args.tokenizer, args.max_length)
    stats["skipped"] = report.skipped
    print(json.dumps(stats, indent=2))
    return 0


def data_convert(args: argparse.Namespace) -> int:
    """Convert any supported format to spt's JSONL format.

    The output is written atomically: on any failure no partial or temp file is left."""
    out = Path(args.out) if args.out else Path(args.file).with_suffix(".jsonl")
    if out.resolve() == Path(args.file).resolve():
        raise ValueError(f"--out {out} would overwrite the input file")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the output file's path")
    examples = read_examples(args.file, args.data_format, args.strict)
    n = _write_outputs({out: examples})[out]
    print(f"wrote {n} examples to {out}")
    return 0


def data_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic persona-chat corpus (personas with latent speaking styles) as JSONL.

    Writes DIR/synthetic.jsonl and, with --split, one file per split (split by dialogue).
    """
    from .data.synth import synth_examples

    out = Path(args.out)
    fractions = parse_fractions(args.split) if args.split else None
    if fractions and "synthetic" in fractions:
        raise ValueError("--split: the name 'synthetic' is taken by DIR/synthetic.jsonl; choose another")
    _check_out_dir(out)
    examples = synth_examples(args.dialogues, seed=args.seed)
    n = write_jsonl(examples, out / "synthetic.jsonl")
    print(f"wrote {n} examples from {args.dialogues} dialogues to {out / 'synthetic.jsonl'}")
    if fractions:
        _write_splits(examples, fractions, args.seed, out)
    return 0


def data_split(args: argparse.Namespace) -> int:
    """Split a data file by dialogue (a dialogue never spans two splits) into DIR/<split>.jsonl.

    Split names must be plain names ([A-Za-z0-9][A-Za-z0-9_.-]*). All split files are written or none:
    on any failure no partial or temp file is left."""
    fractions = parse_fractions(args.fractions)
    out = Path(args.out)
    _check_out_dir(out)
    source = Path(args.file).resolve()
    for name in fractions:
        if (out / f"{name}.jsonl").resolve() == source:
            raise ValueError(f"split {name!r} would overwrite the input file {args.file}")
    examples = read_examples(args.file, args.data_format, args.strict)
    _write_splits(examples, fractions, args.seed, out)
    return 0


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")


def _write_outputs(files: dict[Path, list]) -> dict[Path, int]:
    """Write JSONL files all or nothing (see write_jsonl_files); an OSError becomes a one-line error."""
    from .data import write_jsonl_files

    try:
        return write_jsonl_files(files)
    except OSError as e:
        raise ValueError(f"cannot write {e.filename or next(iter(files))}: {e.strerror or e}") from None


def _write_splits(examples, fractions: dict[str, float], seed: int, out: Path) -> None:
    parts = split_by_dialogue(examples, fractions, seed)
    files = {name: out / f"{name}.jsonl" for name in parts}
    counts = _write_outputs({files[name]: part for name, part in parts.items()})
    for name, part in parts.items():
        if not part:
            log.warning("split %r is empty (%d dialogue(s) to split in all)", name,
                        len({e.dialogue_id for e in examples}))
        print(f"{name}: {counts[files[name]]} examples, {len({e.dialogue_id for e in part})} dialogues "
              f"-> {files[name]}")


def data_download(args: argparse.Namespace) -> int:
    """Download a dataset (convai2) into the cache (~/.cache/spt/data or $SPT_CACHE). Needs network."""
    from .data.download import download

    print(download(args.name))
    return 0


# --- configuration ---------------------------------------------------------------------------------

def config_show(args: argparse.Namespace) -> int:
    """Print the resolved config (defaults, then --config, then dotted overrides) with every setting's doc.

    Examples:
      spt config show                                   # every setting, its default and what it does
      spt config show --config configs/tiny-cpu.yaml --train.lr=0.01
    The output is valid YAML: save it and pass it back with --config.
    """
    from .config import describe, load_config, parse_overrides

    print(describe(load_config(args.config, parse_overrides(args.overrides))), end="")
    return 0


# --- training ------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    """Train a method (spt by default) from a YAML config with dotted overrides.

    Examples:
      spt train --config configs/tiny-cpu.yaml --output-dir runs/x --train.max_steps=20
      spt train --resume runs/x                       # continue from runs/x/checkpoint-last
      spt train --resume runs/x --train.max_steps=40  # ... and train further (lr, schedule, losses may change too)
      spt train --config c.yaml --output-dir runs/x --overwrite  # replace the run in runs/x

    A folder that already holds a run is refused unless --resume continues it or --overwrite replaces it.
    Ctrl-C stops after the step in progress and saves checkpoint-last there (a second Ctrl-C stops at once).
    """
    from .checkpoint import checkpoint_config, resolve_checkpoint
    from .config import load_config, parse_overrides
    from .train import train

    overrides = parse_overrides(args.overrides)
    if args.resume:
        ckpt = resolve_checkpoint(args.resume, prefer="checkpoint-last")
        cfg = checkpoint_config(ckpt, overrides)
        run_dir = ckpt.parent if Path(args.resume).resolve() == ckpt.resolve() else Path(args.resume)
        output_dir = args.output_dir or run_dir
    else:
        if not args.output_dir:
            raise ValueError("--output-dir is required (or --resume RUN_DIR)")
        cfg = load_config(args.config, overrides)
        output_dir = args.output_dir
    result = train(cfg, output_dir, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"trained {result.step} steps in {result.seconds:.1f}s; best valid loss "
          f"{result.best_val_loss if result.best_val_loss is None else round(result.best_val_loss, 4)}; "
          f"checkpoints in {result.output_dir}")
    return 0


# --- generation and evaluation --------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    """Generate replies for a data file with a trained run (each row with its own selected prompt).

    Writes JSONL: persona, context, reference, prediction, selected prompt and the K scores, and the
    reference's NLL (ref_nll; null where the reference does not fit data.max_length: it is not scored,
    and spt eval leaves it out of PPL). Generation options are dotted overrides, e.g.
    --generate.num_beams=4 --generate.max_new_tokens=32. --model.name_or_path=PATH (and --model.tokenizer,
    --model.dtype) load the run's base model from elsewhere, e.g. after it was moved.
    """
    from .config import parse_overrides
    from .pipeline import generate_file

    overrides = parse_overrides(args.overrides)
    unknown = [k for k in overrides if not k.startswith("generate.") and k not in GENERATE_MODEL_OVERRIDES]
    if unknown:
        raise ValueError(f"only --generate.* and --{', --'.join(GENERATE_MODEL_OVERRIDES)} overrides apply here, "
                         f"got --{', --'.join(unknown)}")
    gen = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("generate.")}
    model = {k: v for k, v in overrides.items() if k in GENERATE_MODEL_OVERRIDES}
    out = generate_file(args.run, args.data, args.out, args.limit, gen, args.data_format, not args.no_progress,
                        overrides=model)
    print(f"wrote predictions to {out}")
    return 0


GENERATE_MODEL_OVERRIDES = ("model.name_or_path", "model.tokenizer", "model.dtype")



def cmd_eval(args: argparse.Namespace) -> int:
    """Score a run's predictions: metrics.json, report.md and plots (selection, loss curves).

    Metrics: F1 (ParlAI-normalised and unnormalised), BLEU and BLEU-1..4 (sacreBLEU), ROUGE-1/2/L,
    DIST-1/2, perplexity of the references, BERTScore and METEOR where available, prompt selection.

    Every row is checked before anything is scored: a row that cannot be used (not UTF-8, not a JSON
    object, a missing or mistyped field) stops with one line naming FILE:LINE and the field, exit 2, and
    nothing written. Counted instead, with a warning and a count in metrics.json: rows without ref_nll
    (left out of PPL: ppl_unscored) and prompts outside 0..K-1 (left out of the histogram:
    selection_out_of_range). Loads no model (--model.* overrides are accepted and unused).
    """
    from .config import parse_overrides
    from .pipeline import evaluate_file

    metrics, report = evaluate_file(args.run, args.predictions, args.out, parse_overrides(args.overrides))
    keys = ("f1", "bleu", "rouge1", "rouge2", "rougeL", "bertscore_f1", "dist1", "dist2", "meteor", "ppl")
    print(json.dumps({k: round(metrics[k], 3) for k in keys if isinstance(metrics.get(k), float)}, allow_nan=False))
    print(f"report: {report}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Put several evaluated runs side by side, each metric with a bootstrap confidence interval, and each
    run's difference from the first with a paired bootstrap test.

    Intervals resample the evaluated examples (RUN/eval/per_example.jsonl, written by spt eval; runs evaluated
    by an older spt fall back to RUN/predictions.jsonl, without METEOR and BERTScore, or get [n/a]). Runs
    evaluated on the same examples are tested on the same resamples: "~" marks a difference within noise
    (its 95% interval contains 0). The output is the same for the same --seed.
    """
    from .report import compare_runs, comparison_plot, load_runs

    named, examples = load_runs(args.runs)
    table, boot = compare_runs(named, examples, args.bootstrap, args.seed)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.plot:
        names = ", ".join(name for name, _ in named)
        comparison_plot(named, Path(args.plot), f"{len(named)} runs compared: {names[:100]}", boot)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Run a study: each arm of the experiment file is trained, generated and evaluated, then compared.

    Finished arms (with eval/metrics.json) are skipped, so an interrupted study continues where it stopped,
    but only while their settings and data are unchanged: otherwise the run stops before anything starts
    and names the arms and fields (--rerun-stale reruns them). Every arm is validated before any runs.
    Dotted overrides apply to every arm:  spt experiment --config x.yaml --train.max_steps=5
    --data FILE_OR_DIR runs the arms on other data (a file is split by dialogue; a folder with train.* and
    valid.*, or PersonaChat's *_self_original_no_cands.txt, is used as it is). --dry-run validates every arm
    and prints what would run. The comparison gives each metric a bootstrap confidence interval and tests
    each arm against the first (--bootstrap N resamples; 0: none).
    """
    from .config import parse_overrides
    from .experiment import load_experiment, run_experiment

    exp = load_experiment(args.config, args.output_dir, parse_overrides(args.overrides), data=args.data,
                          bootstrap=args.bootstrap)
    table = run_experiment(exp, Path(args.config).parent, progress=not args.no_progress,
                           rerun_stale=args.rerun_stale, dry_run=args.dry_run)
    print(table)
    if not args.dry_run:
        print(f"comparison: {exp.output_dir / 'comparison.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole method offline: synthetic data, a base LM from scratch, PT vs SPT, a comparison report.

    Takes about 10 minutes on 2 CPU cores (--quick: about a minute; 64 and 78 s measured on 2 shared CPU
    cores, the tiny base LM, library and model loading taking most of it). Stages already done in --out
    are reused.
    """
    import os
    import time

    from .demo import run_demo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on a hub
    start = time.time()
    key = run_demo(Path(args.out), quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print("\n== spt demo ==")
    for stage, seconds in key["stages_s"].items():
        print(f"  {stage:<22} {seconds:7.1f} s")
    print(f"  {'total':<22} {time.time() - start:7.1f} s")
    cols = list(key["spt"])
    print("\n  " + " ".join(f"{c:>12}" for c in ["", *cols]))
    for arm in ("pt", "spt"):
        print("  " + " ".join([f"{arm.upper():>12}", *(f"{key[arm][c]:12.2f}" for c in cols)]))
    print(f"\n  {key['verdict']}")
    print(f"  style -> prompt routing: accuracy {key['style_routing_accuracy']:.2f} (chance ~0.25), "
          f"NMI {key['style_nmi']:.2f}")
    print(f"\nreport: {key['report']}")
    return 0


# --- export -----------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    """Export an spt or pt run's soft prompts as standard PEFT prompt-tuning adapters.

      spt export RUN --to peft OUT           # OUT/prompt-{k}/ for k < K, retriever.safetensors, spt_export.json,
                                             # README.md (a model card)
      spt export runs/pt --to peft out/pt    # then continue the PT prompt as an SPT bank:
      spt train --config c.yaml --output-dir runs/spt --spt.init_from_peft=out/pt/prompt-0

    Each OUT/prompt-k loads with PeftModel.from_pretrained(base, "OUT/prompt-k"); choosing the prompt for a
    dialogue needs spt's retriever (spt.export.load_exported). OUT is written atomically; a non-empty OUT is
    refused unless --overwrite. --model.name_or_path=PATH names the base model if it has moved.
    """
    from .config import parse_overrides
    from .export import export_peft

    overrides = parse_overrides(args.overrides)
    unknown = [k for k in overrides if k not in GENERATE_MODEL_OVERRIDES]
    if unknown:
        raise ValueError(f"only --{', --'.join(GENERATE_MODEL_OVERRIDES)} overrides apply here, "
                         f"got --{', --'.join(unknown)}")
    result = export_peft(args.run, args.out, overwrite=args.overwrite, overrides=overrides,
                         prefer=f"checkpoint-{args.checkpoint}")
    print(f"exported {result.K} prompt(s) (n={result.n}, d={result.d}) of {result.checkpoint} to {result.out}")
    return 0


# --- chat and serve -------------------------------------------------------------------------------

def _load_responder(args: argparse.Namespace, sections: tuple[str, ...]):
    """spt.load(RUN) with the dotted overrides allowed here (``sections`` and the model's location)."""
    from .api import load
    from .config import parse_overrides

    overrides = parse_overrides(args.overrides)
    unknown = [k for k in overrides if not k.startswith(sections) and k not in GENERATE_MODEL_OVERRIDES]
    if unknown:
        allowed = ", ".join(f"--{s}*" for s in sections)
        raise ValueError(f"only {allowed} and --{', --'.join(GENERATE_MODEL_OVERRIDES)} overrides apply here, "
                         f"got --{', --'.join(unknown)}")
    return load(args.run, overrides=overrides)


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a trained run (any method's run or checkpoint folder) in the terminal.

    The persona: --persona "i like cats." (repeat it for more sentences), --persona-file F (one sentence a
    line), or --random-persona DATA (the persona of a random example of a data file; --seed). Each reply shows
    the selected prompt and the K retriever scores, e.g. [prompt 2 | 0.01 0.03 0.91 0.05] (spt, pt).
    The history is formatted and truncated exactly as in training (data.max_context_turns, data.max_length).

    Commands: /persona (show), /persona A. | B. (set; resets the history), /reset, /retry (a new, sampled
    reply to the last message), /save FILE (spt JSONL, one example per reply), /help, /exit; Ctrl-D, Ctrl-C.
    Generation options are dotted overrides, e.g. --generate.num_beams=10 --generate.no_repeat_ngram_size=4.
    With piped stdin it reads one message or command a line and prints plain lines (no prompt, no colour):
      printf 'hi !\n/save chat.jsonl\n' | spt chat runs/x --persona "i like cats."
    """
    from .chat import chat, random_persona, read_persona_file

    persona = list(args.persona or [])
    if args.persona_file:
        persona += read_persona_file(args.persona_file)
    if args.random_persona:
        if persona:
            raise ValueError("--random-persona cannot be combined with --persona or --persona-file")
        persona = random_persona(args.random_persona, args.seed)
    if not any(p.strip() for p in persona):
        raise ValueError("no persona: give --persona, --persona-file or --random-persona")
    responder = _load_responder(args, ("generate.",))
    interactive = sys.stdin.isatty()
    chat(responder, persona, sys.stdin, sys.stdout, interactive, color=interactive and sys.stdout.isatty())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a trained run over HTTP: an OpenAI-compatible POST /v1/chat/completions, with dynamic batching.

    Concurrent requests with the same generation settings are collected for serve.batch_window_ms and run
    as ONE generate call (up to serve.max_batch rows), each row with its own selected soft prompt. Also
    GET /health (counters), GET /v1/models and the OpenAPI docs at /docs. Limits are --serve.* overrides
    (max_new_tokens, max_input_tokens, reject_long_inputs, max_batch, batch_window_ms, request_timeout_s,
    max_queue, max_body_bytes, max_n); default decoding is --generate.* (greedy unless a request samples).
      spt serve runs/x --port 8000 --serve.max_batch=32 --generate.no_repeat_ngram_size=4
    Needs the serve extra: pip install -e ".[serve]".
    """
    try:
        from .serve import serve
    except ImportError as e:
        raise ValueError(f"spt serve needs the serve extra (pip install -e \".[serve]\"): {e}") from None

    responder = _load_responder(args, ("generate.", "serve."))
    serve(responder, args.host, args.port, args.name or Path(args.run).resolve().name)
    return 0


# --- parser --------------------------------------------------------------------------------------

def _add(sub, name: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    doc = (fn.__doc__ or "").strip()
    p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=fn)
    return p


def _data_input(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="data file (ParlAI text, HF JSON, Synthetic-Persona-Chat CSV or spt JSONL)")
    p.add_argument("--data-format", choices=FORMATS, default=None, help="input format (default: detect)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed item instead of skipping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect, convert, generate and split persona-dialogue data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = _add(dsub, "stats", data_stats)
    _data_input(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer name or folder for token lengths")
    p.add_argument("--max-length", type=int, default=512)
    p = _add(dsub, "convert", data_convert)
    _data_input(p)
    p.add_argument("--to", choices=["jsonl"], default="jsonl")
    p.add_argument("--out", default=None, help="output file (default: input name with .jsonl)")
    p = _add(dsub, "synth", data_synth)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dialogues", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, help="also split by dialogue, e.g. train=0.8,valid=0.1,test=0.1")
    p = _add(dsub, "split", data_split)
    _data_input(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fractions", default="train=0.8,valid=0.2")
    p.add_argument("--seed", type=int, default=0)
    p = _add(dsub, "download", data_download)
    p.add_argument("name", choices=["convai2"])

    config = sub.add_parser("config", help="show the resolved config with every setting's doc")
    csub = config.add_subparsers(dest="config_command", required=True)
    p = _add(csub, "show", config_show)
    p.add_argument("--config", default=None, help="YAML config (defaults apply where it is silent)")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "train", cmd_train)
    p.add_argument("--config", default=None, help="YAML config (defaults apply where it is silent)")
    p.add_argument("--output-dir", default=None, help="run folder for checkpoints and logs")
    p.add_argument("--resume", default=None, help="run or checkpoint folder to continue from")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "generate", cmd_generate)
    p.add_argument("run", help="run or checkpoint folder")
    p.add_argument("--data", default=None, help="data file (default: the config's data.test, then data.valid)")
    p.add_argument("--data-format", choices=FORMATS, default=None)
    p.add_argument("--out", default=None, help="predictions JSONL (default: RUN/predictions.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="first N examples only (N >= 1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "eval", cmd_eval)
    p.add_argument("run", help="run folder (reads RUN/predictions.jsonl, writes RUN/eval/)")
    p.add_argument("--predictions", default=None)
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval)")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "experiment", cmd_experiment)
    p.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    p.add_argument("--output-dir", default=None, help="overrides the file's output_dir")
    p.add_argument("--rerun-stale", action="store_true",
                   help="rerun finished arms whose settings or data changed (instead of refusing)")
    p.add_argument("--data", default=None, metavar="FILE_OR_DIR",
                   help="run on this data instead of the file's (a file is split by dialogue as the file's split "
                        "says; a folder with train.* and valid.*, or PersonaChat's *_self_original_no_cands.txt)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help="bootstrap resamples for the comparison's intervals and tests (default: the file's, or 1000)")
    p.add_argument("--dry-run", action="store_true", help="make the data split, validate every arm, print the plan")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "demo", cmd_demo)
    p.add_argument("--out", default="runs/demo", help="folder for data, runs and the report")
    p.add_argument("--quick", action="store_true", help="a tiny smoke test (about a minute on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = _add(sub, "chat", cmd_chat)
    p.add_argument("run", help="run or checkpoint folder (any method)")
    p.add_argument("--persona", action="append", default=None, metavar="SENTENCE",
                   help="a persona sentence (repeat for more)")
    p.add_argument("--persona-file", default=None, help="persona sentences, one per line")
    p.add_argument("--random-persona", default=None, metavar="DATA", help="a random example's persona from DATA")
    p.add_argument("--seed", type=int, default=0, help="which random persona (with --random-persona)")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "serve", cmd_serve)
    p.add_argument("run", help="run or checkpoint folder (any method)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model name clients use (default: the run folder's name)")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "export", cmd_export)
    p.add_argument("run", help="run or checkpoint folder of an spt or pt run")
    p.add_argument("--to", choices=["peft"], required=True, help="what to export to")
    p.add_argument("out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="which checkpoint of a run folder (default: best, else last)")
    p.set_defaults(takes_overrides=True)

    p = _add(sub, "compare", cmd_compare)
    p.add_argument("runs", nargs="+", help="evaluated run folders (or metrics.json files); the first is the base")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for confidence intervals and paired tests (0: none; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot the runs with their intervals here")
    return parser


def quiet_third_parties(verbose: bool, progress: bool) -> None:
    """Other libraries' chatter (rouge-score's absl INFO lines, transformers' notices) at debug level only;
    their progress bars (loading weights, writing shards) only where progress is wanted."""
    if verbose:
        return
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if int(os.environ.get("RANK", "0")) > 0:  # a second process of `accelerate launch`: rank 0 speaks
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        args.verbose, args.no_progress = False, True
        logging.basicConfig(level=logging.ERROR)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_third_parties(verbose=args.verbose, progress=not getattr(args, "no_progress", False))
    try:
        return args.func(args)
    except (DataError, ValueError, OSError, RuntimeError) as e:  # OSError: unwritable folder, full disk...
        print("spt: error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
