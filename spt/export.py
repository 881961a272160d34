"""Export an SPT or PT run's prompt bank as standard PEFT prompt-tuning adapters, and start a bank from them.

    spt export RUN --to peft OUT

OUT/prompt-{k}/         one PEFT prompt-tuning adapter per soft prompt (adapter_config.json,
                        adapter_model.safetensors), written by peft itself; ``PeftModel.from_pretrained(base,
                        OUT/prompt-k)`` runs the base model with prompt k
OUT/retriever.safetensors   what chooses the prompt: the retriever's tensors (``retriever.*`` as in the run's
                        model.safetensors) and ``selection_keys`` (K, d), the keys it scores the prompts by
OUT/spt_export.json     K, n, d, base model, method, the selection and input-format settings, versions
OUT/README.md           a model card

``spt.init_from_peft`` goes the other way: :func:`read_peft_prompt` reads a prompt-tuning adapter (JSON and
safetensors only, nothing is unpickled) and :func:`load_peft_bank` builds the (K, n, d) bank a fresh run starts
from. :func:`load_exported` rebuilds the whole bank and retriever from an export, to choose prompts.

PEFT and spt place the prompt alike for unpadded and right-padded rows: PEFT prepends the n virtual tokens to
every row and numbers positions 0, 1, ... over the concatenation, which is spt's layout and numbering there.
Left-padded rows differ: PEFT gives (prompt, pad, text) and drops position ids, so models that number
positions by index (GPT-2, Llama, ...) shift the text by the padding; spt gives (pad, prompt, text) and counts
real tokens only. OPT numbers positions from the attention mask and agrees. And PEFT 0.21.2's ``generate`` on
transformers 5 re-inserts the prompt at every cached decoding step (it looks for the cache as
``past_key_values``, now ``cache``): only ``use_cache=False`` generates as spt does. See the model card.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import atomic_dir, check_base_model, checkpoint_config, read_trainable, resolve_checkpoint
from .config import Config

log = logging.getLogger(__name__)

EXPORT_JSON = "spt_export.json"
RETRIEVER = "retriever.safetensors"
CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"  # the tensor name PEFT saves a prompt-tuning adapter under
FORMAT = "spt-peft-export"
FORMAT_VERSION = 1
SELECTION_KEYS = "selection_keys"
METRIC_KEYS = ("n", "f1", "bleu", "rouge1", "rouge2", "rougeL", "bertscore_f1", "dist1", "dist2", "meteor", "ppl")


def adapter_name(k: int) -> str:
    return f"prompt-{k}"


# --- export --------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    K: int
    n: int
    d: int
    adapters: list[Path]


def _check_out(out: Path, ckpt: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; give a folder to export to")
    resolved = out.resolve()
    if resolved == ckpt.resolve() or resolved in ckpt.resolve().parents:
        raise ValueError(f"{out}: holds the run being exported ({ckpt}); export to another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: not empty; pass --overwrite to replace it")


def _meta_lm(name_or_path: str):
    """The base model's architecture on the meta device: no weights are read, whatever its size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{name_or_path}: cannot read the base model's config to build the adapters "
                                f"({str(e).splitlines()[0]}); pass --model.name_or_path=PATH") from None


def _run_folder(ckpt: Path) -> Path:
    return ckpt.parent if ckpt.name.startswith(("checkpoint-", ".checkpoint-")) else ckpt


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); left out of the model card", path, e)
        return None


def training_info(ckpt: Path) -> dict[str, Any]:
    """Steps trained (train_summary.json), the exported checkpoint's step and valid loss, and every evaluation
    (metrics.json in the run folder or one level below) with its scalar metrics."""
    run = _run_folder(ckpt)
    info: dict[str, Any] = {"run": str(run.resolve()), "checkpoint": ckpt.name, "steps": None,
                            "checkpoint_step": None, "checkpoint_valid_loss": None, "evaluations": []}
    summary = _read_json(run / "train_summary.json") if (run / "train_summary.json").is_file() else None
    history = []
    if isinstance(summary, dict):
        info["steps"] = summary.get("step")
        history = [h for h in summary.get("history") or [] if isinstance(h, dict)
                   and isinstance(h.get("loss"), int | float) and isinstance(h.get("step"), int)]
    state = _read_json(ckpt / "trainer_state.json") if (ckpt / "trainer_state.json").is_file() else None
    if isinstance(state, dict) and isinstance(state.get("step"), int):  # checkpoint-last
        info["checkpoint_step"] = state["step"]
        info["checkpoint_valid_loss"] = next((h["loss"] for h in history if h["step"] == state["step"]), None)
    elif history and ckpt.name == "checkpoint-best":  # saved at the first lowest validation loss
        best = min(history, key=lambda h: h["loss"])
        info["checkpoint_step"], info["checkpoint_valid_loss"] = best["step"], best["loss"]
    for path in sorted(run.glob("metrics.json")) + sorted(run.glob("*/metrics.json")):
        data = _read_json(path)
        if not isinstance(data, dict):
            continue
        scores = {k: data[k] for k in METRIC_KEYS if isinstance(data.get(k), int | float)
                  and not isinstance(data.get(k), bool) and math.isfinite(data[k])}
        provenance = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
        info["evaluations"].append({"file": str(path.relative_to(run)), "data": provenance.get("data"),
                                    "metrics": scores})
    return info


def export_peft(run: str | Path, out: str | Path, overwrite: bool = False, overrides: dict | None = None,
                prefer: str = "checkpoint-best") -> ExportResult:
    """Write the K prompts of an SPT or PT run as K PEFT prompt-tuning adapters plus the retriever (see the
    module doc). ``overrides``: dotted config fields, e.g. {"model.name_or_path": NEW_PATH} for a moved base
    model. OUT is written atomically; a non-empty OUT is refused unless ``overwrite``."""
    from peft import PromptTuningConfig, get_peft_model
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(run, prefer=prefer)
    out = Path(out)
    _check_out(out, ckpt, overwrite)
    cfg = checkpoint_config(ckpt, overrides)
    if cfg.method not in ("spt", "pt"):
        raise ValueError(f"{ckpt}: a {cfg.method} run has no prompt bank; spt export takes spt and pt runs")
    tensors = read_trainable(ckpt)
    prompts = tensors.get("prompts")
    K, n = cfg.spt.K, cfg.spt.num_virtual_tokens
    if prompts is None or prompts.dim() != 3 or tuple(prompts.shape[:2]) != (K, n):
        shape = None if prompts is None else tuple(prompts.shape)
        raise ValueError(f"{ckpt / 'model.safetensors'}: prompts has shape {shape}, but its config says "
                         f"K={K}, n={n}")
    d = prompts.shape[2]
    check_base_model(cfg, ckpt)
    base = cfg.model.name_or_path
    lm = _meta_lm(base)
    width = lm.get_input_embeddings().weight.shape[1]
    if width != d:
        raise ValueError(f"{ckpt / 'model.safetensors'}: prompts are {d} wide, but base model {base!r} embeds "
                         f"tokens in {width} dimensions")
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(lm, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                           base_model_name_or_path=base))
    token_dim = peft_model.peft_config["default"].token_dim
    if token_dim != d:
        raise ValueError(f"{base}: PEFT would build {token_dim}-wide virtual tokens for this model, but its input "
                         f"embeddings (and the prompts) are {d} wide; it cannot take these prompts")
    encoder = peft_model.prompt_encoder["default"]

    retriever = {k: v.float().contiguous() for k, v in tensors.items() if k.startswith("retriever.")}
    keys = retriever.get("retriever.keys")
    retriever[SELECTION_KEYS] = (keys if keys is not None else prompts.float().mean(1)).clone().contiguous()
    info = training_info(ckpt)
    meta = export_info(cfg, ckpt, K, n, d, retriever, info)

    def write(tmp: Path) -> None:
        for k in range(K):
            encoder.embedding.weight = torch.nn.Parameter(prompts[k].float().clone(), requires_grad=False)
            folder = tmp / adapter_name(k)
            peft_model.save_pretrained(str(folder))
            (folder / CARD).write_text(adapter_card(meta, k), encoding="utf-8")  # instead of PEFT's blank template
        save_file(retriever, str(tmp / RETRIEVER), metadata={"format": FORMAT, "K": str(K), "d": str(d)})
        (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(model_card(meta, info), encoding="utf-8")

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per adapter of a few kilobytes
    try:
        atomic_dir(out, write)
    except OSError as e:
        raise ValueError(f"{out}: cannot write the export ({e.strerror or e}); nothing was written") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    log.debug("exported %d prompt(s) of %s to %s", K, ckpt, out)
    return ExportResult(out, ckpt, K, n, d, [out / adapter_name(k) for k in range(K)])


def export_info(cfg: Config, ckpt: Path, K: int, n: int, d: int, retriever: dict[str, torch.Tensor],
                info: dict[str, Any]) -> dict[str, Any]:
    """The content of spt_export.json."""
    import dataclasses

    import peft

    s = cfg.spt
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "spt_version": __version__,
        "peft_version": peft.__version__, "method": cfg.method, "K": K, "n": n, "d": d,
        "base_model": cfg.model.name_or_path, "tokenizer": cfg.model.tokenizer or cfg.model.name_or_path,
        "adapters": [adapter_name(k) for k in range(K)],
        "checkpoint": str(ckpt.resolve()), "checkpoint_step": info.get("checkpoint_step"),
        "training_steps": info.get("steps"),
        "data": {"train": cfg.data.train, "valid": cfg.data.valid, "test": cfg.data.test},
        # S_k = softplus_beta(cos(W key_k + b, W (pool(query) - c) + b)), prompt k* = argmax_k S_k (spt.retriever)
        "selection": {"rule": "argmax", "query": s.query, "retriever": s.retriever,
                      "retriever_layers": s.retriever_layers, "softplus_beta": s.softplus_beta,
                      "softplus_threshold": s.softplus_threshold, "center_features": bool(s.center_features),
                      "keys": s.keys, "selection_noise": s.selection_noise,
                      "tensors": {k: list(v.shape) for k, v in retriever.items()}},
        # the inference input the retriever reads and the prompts were trained on (spt.format)
        "input_format": {"template": "<bos>given persona: {persona}; context: Q: {turn} R: {turn} ... R:",
                         "max_length": cfg.data.max_length, "max_context_turns": cfg.data.max_context_turns,
                         "instruction": cfg.data.instruction},
        "spt_config": dataclasses.asdict(s),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def adapter_card(meta: dict[str, Any], k: int) -> str:
    return (f"---\nbase_model: {meta['base_model']}\nlibrary_name: peft\ntags: [prompt-tuning, spt]\n---\n\n"
            f"# Soft prompt {k} of {meta['K']}\n\nA PEFT prompt-tuning adapter ({meta['n']} virtual tokens) "
            f"exported by spt {meta['spt_version']} from a {meta['method']} run. See ../{CARD} for the input "
            f"format and how the prompt for a dialogue is chosen.\n")


def model_card(meta: dict[str, Any], info: dict[str, Any]) -> str:
    K, n, base = meta["K"], meta["n"], meta["base_model"]
    data = meta["data"]
    lines = [
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags: [prompt-tuning, spt, selective-prompt-tuning]\n---\n",
        f"# {'Selective prompt tuning' if meta['method'] == 'spt' else 'Prompt tuning'}: "
        f"{K} soft prompt{'s' if K > 1 else ''} for {base}\n",
        f"Exported by spt {meta['spt_version']} (peft {meta['peft_version']}) from `{info['run']}` "
        f"({info['checkpoint']}).\n",
        "| | |\n| --- | --- |",
        f"| base model | `{base}` |",
        f"| method | {meta['method']} |",
        f"| prompts (K) | {K}: `prompt-0` ... `prompt-{K - 1}` |" if K > 1 else "| prompts (K) | 1: `prompt-0` |",
        f"| virtual tokens per prompt (n) | {n} |",
        f"| width (d) | {meta['d']} |",
        f"| training data | {_fmt(data['train'])} |",
        f"| validation data | {_fmt(data['valid'])} |",
        f"| training steps | {_fmt(info['steps'])} |",
        f"| exported checkpoint | {info['checkpoint']}, step {_fmt(info['checkpoint_step'])}, "
        f"validation loss {_fmt(info['checkpoint_valid_loss'])} |",
        "",
        "## Metrics\n",
    ]
    evaluations = [e for e in info["evaluations"] if e["metrics"]]
    if evaluations:
        cols = [k for k in METRIC_KEYS if any(k in e["metrics"] for e in evaluations)]
        lines += ["| evaluation | data | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
        lines += [f"| {e['file']} | {_fmt(e['data'])} | " + " | ".join(_fmt(e["metrics"].get(c)) for c in cols)
                  + " |" for e in evaluations]
    else:
        lines.append("The run has not been evaluated (no metrics.json in its folder).")
    lines += [
        "",
        "## Use one prompt with PEFT\n",
        "Each `prompt-k` folder is a standard PEFT prompt-tuning adapter:\n",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{meta["tokenizer"]}")',
        'model = PeftModel.from_pretrained(base, "OUT/prompt-0")  # OUT: this folder',
        'text = "given persona: i love cats. i have two dogs.; context: Q: hi , how are you ? R:"',
        "inputs = tokenizer(tokenizer.bos_token + text, return_tensors=\"pt\", add_special_tokens=False)",
        "reply = model.generate(**inputs, max_new_tokens=32, use_cache=False)  # see below for use_cache",
        "```\n",
        "The prompts were trained on inputs in spt's template, which starts with the BOS token:",
        "`<bos>given persona: {persona}; context: Q: {turn} R: {turn} ... R:` (turns alternate, the last one "
        "is the partner's `Q:`; the reply follows the final `R:`). Feed the same format. spt keeps an input "
        f"within {meta['input_format']['max_length']} tokens, reply included, by dropping the oldest turns first, "
        "then persona tokens from the left.\n",
        "## Choosing the prompt needs spt's retriever\n",
    ]
    if K > 1:
        lines += [
            f"spt picks one of the {K} prompts per dialogue: a retriever scores every prompt against the persona "
            "and context, and the highest score wins. PEFT has no such step; `retriever.safetensors` and "
            f"`{EXPORT_JSON}` hold what it needs, and spt rebuilds it:\n",
            "```python",
            "from spt.export import load_exported",
            "",
            'bank = load_exported("OUT", base)  # the K prompts and the retriever on the base model',
            'k, scores = bank.select(tokenizer, ["i love cats."], ["hi , how are you ?"])',
            'model = PeftModel.from_pretrained(base, f"OUT/prompt-{k}")',
            "```\n",
            f"The selection settings (query: {meta['selection']['query']}, retriever: "
            f"{meta['selection']['retriever']}, keys: {meta['selection']['keys']}) are in `{EXPORT_JSON}`.\n",
        ]
    else:
        lines.append("With one prompt there is nothing to choose: `prompt-0` is used for every dialogue.\n")
    lines += [
        "## Where PEFT and spt differ\n",
        "PEFT prepends the virtual tokens to every row, before any padding, and ignores `position_ids`; spt "
        "puts the prompt right before each row's first real token and counts positions over real tokens only.",
        "- Unpadded and right-padded inputs: the same layout and positions, so the same logits as spt "
        "(checked to 1e-5 in fp32 by spt's tests).",
        "- Left-padded batches (batched generation): PEFT gives (prompt, pad, text). Models that number "
        "positions by index (GPT-2, Llama, Mistral, ...) then see the text shifted by the padding, unlike "
        "in training; OPT numbers positions from the attention mask and is unaffected. For exact results "
        "with such models, generate one dialogue at a time (no padding), or use spt itself (`spt generate`, "
        "`spt chat`, `spt serve`), which handles padding.",
        f"- Generation: with peft {meta['peft_version']} on transformers 5, `generate()` with the KV cache looks "
        "for the cache under its old name (`past_key_values`), takes every decoding step for the first and "
        "inserts the virtual tokens again, so only the first new token is right. Pass `use_cache=False` "
        "(slower: each step re-reads the whole sequence); then greedy generation of one dialogue gives spt's "
        "tokens, and its logits to 1e-5 (spt's tests check both).",
        "",
    ]
    return "\n".join(lines)


# --- import --------------------------------------------------------------------------------------

def read_peft_prompt(folder: str | Path, n: int | None = None, d: int | None = None) -> torch.Tensor:
    """The (n, d) fp32 prompt of a PEFT prompt-tuning adapter folder; JSON and safetensors only.

    ``n``, ``d``: the expected virtual tokens and width; a mismatch is an error naming the folder and field."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter folder")
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    config = _read_json_object(config_path, "a JSON adapter config")
    peft_type = config.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise ValueError(f"{config_path}: peft_type is {peft_type!r}; only prompt-tuning adapters "
                         f"(PROMPT_TUNING) can start a prompt bank")
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise ValueError(f"{config_path}: num_transformer_submodules is {submodules} (an encoder-decoder adapter); "
                         f"spt's prompts are for causal LMs (1)")
    virtual = config.get("num_virtual_tokens")
    if not isinstance(virtual, int) or isinstance(virtual, bool) or virtual <= 0:
        raise ValueError(f"{config_path}: num_virtual_tokens is {virtual!r}, not a positive integer")
    if n is not None and virtual != n:
        raise ValueError(f"{config_path}: num_virtual_tokens is {virtual}, but spt.num_virtual_tokens is {n}")
    token_dim = config.get("token_dim")
    if d is not None and token_dim is not None and token_dim != d:
        raise ValueError(f"{config_path}: token_dim is {token_dim}, but the base model's hidden size is {d}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{folder / 'adapter_model.bin'}: a pickle, which spt never unpickles; save the adapter "
                             f"with safetensors (save_pretrained's default) and try again")
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
    prompt = tensors.get(PROMPT_KEY)
    if prompt is None:
        raise ValueError(f"{weights}: no {PROMPT_KEY!r} tensor (found {sorted(tensors)})")
    width = d if d is not None else token_dim if isinstance(token_dim, int) else prompt.shape[-1]
    if tuple(prompt.shape) != (virtual, width):
        what = "the base model's hidden size" if d is not None else "token_dim"
        raise ValueError(f"{weights}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, but num_virtual_tokens is "
                         f"{virtual} and {what} is {width}")
    prompt = prompt.float()
    if not torch.isfinite(prompt).all():
        raise ValueError(f"{weights}: {PROMPT_KEY} has non-finite values")
    return prompt


def load_peft_bank(folders: list[str], K: int, n: int, d: int) -> torch.Tensor:
    """The (K, n, d) bank from PEFT prompt-tuning adapters: one folder fills all K slots, K folders one each."""
    if len(folders) not in (1, K):
        raise ValueError(f"spt.init_from_peft names {len(folders)} adapter folders; give 1 (copied into all "
                         f"K={K} slots) or K={K} (one per prompt)")
    prompts = [read_peft_prompt(f, n, d) for f in folders]
    return torch.stack(prompts * K if len(prompts) == 1 else prompts)


def init_bank_from_peft(model, cfg: Config) -> None:
    """Copy ``cfg.spt.init_from_peft``'s prompts into ``model.prompts`` (an SPTModel), exactly."""
    folders = cfg.spt.init_from_peft
    K, n, d = model.prompts.shape
    bank = load_peft_bank(folders, K, n, d)
    with torch.no_grad():
        model.prompts.copy_(bank.to(model.prompts.device, model.prompts.dtype))
    log.info("prompt bank started from %s", ", ".join(str(f) for f in folders))
    if len(folders) == 1 and K > 1:
        if cfg.spt.keys == "prompt_mean":
            log.warning("spt.init_from_peft: all %d prompts start identical and spt.keys=prompt_mean scores a "
                        "prompt by its own mean, so every prompt gets the same score and the same gradient: they "
                        "stay identical. Use spt.keys=kmeans (the routed recipe) to let them specialise", K)
        else:
            log.info("spt.init_from_peft: the %d prompts start identical; the k-means retriever keys route "
                     "examples apart, and the routed LM loss lets each prompt specialise", K)


# --- using an export -----------------------------------------------------------------------------

@dataclass
class ExportedBank:
    """An export's prompts and retriever on the base LM (an SPTModel) plus its settings (spt_export.json)."""

    model: Any  # SPTModel
    info: dict[str, Any]

    def formatter(self, tokenizer):
        from .format import DialogueFormatter

        f = self.info["input_format"]
        return DialogueFormatter(tokenizer, f["max_length"], f["max_context_turns"], f["instruction"])

    @torch.no_grad()
    def select(self, tokenizer, persona: list[str], context: list[str]) -> tuple[int, list[float]]:
        """The prompt spt chooses for one dialogue (persona sentences, context turns ending with the partner's),
        and the K scores."""
        ids = self.formatter(tokenizer).encode_prompt(persona, context)
        device = self.model.prompts.device
        input_ids = torch.tensor([ids], device=device)
        mask = torch.ones_like(input_ids)
        S = self.model.scores(*self.model.query(input_ids, mask))  # (K, 1)
        return int(S[:, 0].argmax()), [float(x) for x in S[:, 0]]


def load_exported(folder: str | Path, lm) -> ExportedBank:
    """Rebuild the prompt bank and retriever of ``spt export`` output on ``lm`` (the base model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .config import config_from_dict
    from .model import SPTModel

    folder = Path(folder)
    path = folder / EXPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not an spt export (no {EXPORT_JSON})")
    info = _read_json_object(path, "an spt export")
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: not an spt export (format is not {FORMAT!r})")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {info.get('format_version')} is newer than this spt reads "
                         f"({FORMAT_VERSION}); upgrade spt")
    missing = [k for k in ("method", "K", "n", "d", "adapters", "spt_config", "input_format") if k not in info]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}")
    cfg = config_from_dict({"method": info["method"], "spt": {**info["spt_config"], "init_from_peft": []}})
    model = SPTModel(lm, cfg.spt)
    K, n, d = model.prompts.shape
    if (K, n, d) != (info["K"], info["n"], info["d"]):
        raise ValueError(f"{path}: K, n, d = {info['K']}, {info['n']}, {info['d']}, but its settings on this base "
                         f"model give {K}, {n}, {d}")
    bank = torch.stack([read_peft_prompt(folder / name, n, d) for name in info["adapters"]])
    try:
        tensors = load_file(str(folder / RETRIEVER))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder / RETRIEVER}: unreadable ({e})") from None
    state = {k: v for k, v in tensors.items() if k.startswith("retriever.")}
    expected = {k for k in model.trainable_state_dict() if k.startswith("retriever.")}
    if set(state) != expected:
        raise ValueError(f"{folder / RETRIEVER}: retriever tensors {sorted(state)} do not match the settings in "
                         f"{EXPORT_JSON} (expected {sorted(expected)})")
    with torch.no_grad():
        model.prompts.copy_(bank)
    model.load_state_dict(state, strict=False)
    return ExportedBank(model.eval(), info)


def _read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a one-line ValueError naming the file when it is not ``what``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not {what} (unreadable JSON: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not {what} (not a JSON object)")
    return obj
