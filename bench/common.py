"""Shared set-up for the benchmarks: the device, a model (local folder or a shape built from a config), a batch,
timing that waits for the GPU, the measured matmul peak, peak memory, and the ``name: number`` ratio lines.

Every bench runs unchanged on a CPU or a GPU (``cuda`` when available, else ``cpu``; ``--device`` overrides).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing; PEFT warns that it ignores position ids
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")
warnings.filterwarnings("ignore", message="Position ids are not supported")

from spt.batching import EncodedDataset, collate  # noqa: E402
from spt.data import read_examples  # noqa: E402
from spt.data.synth import synth_examples  # noqa: E402
from spt.format import DialogueFormatter, render_text  # noqa: E402
from spt.modeling import load_lm, load_tokenizer, train_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
MINI = SHARED / "models" / "persona-gpt-mini"
GPT2_TOKENIZER = SHARED / "data" / "gpt2-tokenizer"
PERSONACHAT = SHARED / "data" / "personachat" / "valid_self_original_no_cands.txt"
MODELS = "tiny (2-layer GPT-2, width 32, a BPE trained on synthetic dialogues: the tests), mini (the shared " \
    "persona-gpt-mini), opt125m (OPT-125M shape, random weights, GPT-2 BPE), or a local model folder"


def pick_device(requested: str | None = None) -> torch.device:
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so wall-clock time is the work's time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_and_tokenizer(spec: str):
    """(frozen LM in eval mode, tokenizer) for ``spec``: see ``MODELS``."""
    if spec == "tiny":
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = tiny_tokenizer()
        eos = tok.eos_token_id
        cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=4, n_positions=1024, bos_token_id=eos,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id, attn_pdrop=0.0, embd_pdrop=0.0,
                         resid_pdrop=0.0)
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg).eval(), tok
    if spec == "mini":
        return load_lm(str(MINI)), load_tokenizer(str(MINI))
    if spec == "opt125m":
        from transformers import OPTConfig, OPTForCausalLM

        tok = load_tokenizer(str(GPT2_TOKENIZER))
        cfg = OPTConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                        num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        return OPTForCausalLM(cfg).eval(), tok
    return load_lm(spec), load_tokenizer(spec)


@functools.cache
def tiny_tokenizer():
    """A 384-token byte-level BPE trained on synthetic dialogues (offline, well under a second)."""
    texts = [render_text(e.persona, e.context, e.response) for e in synth_examples(40, seed=7)]
    return train_tokenizer(texts, vocab_size=384)


def examples(n: int, spec: str = ""):
    """The first n PersonaChat validation turns (real lengths) when ../shared has them, else synthetic ones
    (always synthetic for the tiny model, whose tokenizer only knows the synthetic vocabulary)."""
    if spec != "tiny" and PERSONACHAT.is_file():
        return read_examples(PERSONACHAT)[:n]
    return synth_examples(max(n, 8), seed=0)[:n]


def batch(tokenizer, n: int, max_length: int = 512, spec: str = "", batching: str = "grouped"):
    """A training batch of n examples, right-padded to its longest (see ``batch_and_dataset``)."""
    return batch_and_dataset(tokenizer, n, max_length, spec, batching)[0]


def batch_and_dataset(tokenizer, n: int, max_length: int = 512, spec: str = "", batching: str = "grouped"):
    """(a training batch of n examples right-padded to its longest, the EncodedDataset it was drawn from).

    grouped: what ``spt train`` feeds (train.group_by_length, the default): LengthGroupedBatches over the first
    50 * n examples, and of its batches the one whose longest example is the median. first: the first n
    examples (consecutive turns of a few dialogues: lengths spread widely, the most padding)."""
    from spt.batching import LengthGroupedBatches

    pool = examples(n * 50 if batching == "grouped" else n, spec)
    ds = EncodedDataset(pool, DialogueFormatter(tokenizer, max_length))
    if batching == "first":
        picked = list(range(min(n, len(ds))))
    else:
        lengths = ds.lengths()
        full = [b for b in LengthGroupedBatches(lengths, n, seed=0) if len(b) == n] or [list(range(len(ds)))[:n]]
        full.sort(key=lambda b: max(lengths[i] for i in b))
        picked = full[len(full) // 2]
    return collate([ds[i] for i in picked], tokenizer.pad_token_id), ds


def timeit(fn, repeat: int = 3, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median wall seconds of ``fn()`` (on a GPU, synchronised before and after each call)."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a ``size`` x ``size`` matmul loop in ``dtype`` (plain tensors of that dtype, no
    autocast; 2048 on a CPU, 8192 on a GPU, which 2048 cannot fill): the best of the loop's batches over
    ~``seconds``, the practical peak the benches compare to."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2 * size**3
    for _ in range(2):
        a @ b
    best, spent, reps = 0.0, 0.0, 1
    while spent < seconds:
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, reps * flops / dt)
        reps = min(reps * 2, 64) if dt < 0.05 else reps
    return best


# --- memory ----------------------------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory the work inside ``with`` adds over what was allocated when it started, in bytes.

    cuda: ``torch.cuda.max_memory_allocated`` minus the allocation at the start (tensors only, not the
    caching allocator's reserve). cpu: the process's peak resident set (VmHWM, reset at the start through
    /proc/self/clear_refs) minus its resident set at the start: everything the process touched, allocator
    slack included. Memory freed earlier in the same process but still held by malloc is reused without
    raising RSS, so on a CPU an honest figure needs a fresh process per measurement (bench_train_step does
    that unless --in-process). ``bytes`` is None where neither is available."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self._start = device, None, None

    def __enter__(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self._start = _status_kib("VmRSS") * 1024
            except (OSError, AttributeError):
                self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.bytes = _status_kib("VmHWM") * 1024 - self._start


# --- output ----------------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_lines(ratios: dict[str, float]) -> str:
    """One ``name: number`` line per ratio (what tests/test_bench.py and CI read)."""
    return "\n".join(f"{name}: {value:.4g}" for name, value in ratios.items())


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"
