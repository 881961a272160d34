"""One SPT training step (forward, backward, AdamW step; K prompts) in three designs, fp32 and bf16, side by side.

peft:  the real anchor, what the paper's code does through PEFT: one base model with K
       ``peft.PromptTuningConfig`` adapters whose prompt embeddings are spt's bank, one forward per adapter
       (``set_adapter``) over the batch right-padded to 512 tokens (data.max_length), full-vocabulary logits
       and PEFT's own loss; the K losses are summed and back-propagated together (the paper's selection and
       fusion losses need all K at once), then AdamW steps the K prompts.
paper: the same computation emulated on spt's model (K passes, padding to 512, full logits): checks the
       emulation against the real thing.
spt:   one batch of K*B rows padded only to the batch's longest example, the LM head at response positions
       only, all of spt's losses (the default "routed" recipe), AdamW on prompts and retriever.

bf16 is ``torch.autocast(dtype=bfloat16)`` around the forward (the backward outside it, as spt train does);
spt's default precision is what ``train.mixed_precision: auto`` picks on this device.

Per design and precision: median s/step over --repeat steps after one warm-up step, examples/s, the peak
memory the steps add (see ``common.PeakMemory``; by default each design runs in a fresh process so memory
freed by one design cannot hide another's peak), the FLOPs the step executes (matmuls and attention, forward
and backward, counted by ``torch.utils.flop_counter`` on the warm-up step) and their rate as a fraction of the
matmul peak measured in the same run (a 2048x2048 matmul loop in fp32 and in bf16, 8192 on a GPU, before and
after the designs; the better of the two, as another process may share the machine). In fp32 spt's per-prompt
LM losses must equal PEFT's (same prompts, same data, right padding where PEFT and spt place the prompt alike;
each the mean token NLL over the batch's response tokens) to 1e-4.

Output: a Markdown table, then one ``name: number`` line per ratio. ``--profile`` adds a torch.profiler table
of spt's bf16 step (top ops by self CPU time, or by self CUDA time on a GPU).

Run: python bench/bench_train_step.py [--model tiny|mini|opt125m|PATH] [--K 4] [--batch 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import (
    MODELS,
    PeakMemory,
    batch,
    fmt_bytes,
    markdown_table,
    matmul_peak,
    model_and_tokenizer,
    pick_device,
    ratio_lines,
    sync,
)
from spt.config import SPTConfig
from spt.format import IGNORE_INDEX
from spt.model import SPTModel, splice

DESIGNS = ("peft", "paper", "spt")
PRECISIONS = ("fp32", "bf16")
LOSS_TOLERANCE = 1e-4
RESULT = "RESULT "


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def default_precision(device: torch.device) -> str:
    """What ``train.mixed_precision: auto`` trains in on this device (fp16 GPUs are timed as fp32 here)."""
    from spt.train import resolve_mixed_precision

    return "bf16" if resolve_mixed_precision("auto") == "bf16" else "fp32"


def pad_to_max_length(model: SPTModel, b: dict, max_length: int) -> dict:
    """The batch right-padded to ``max_length`` tokens, data.max_length (512), as the paper's code pads (less
    the prompt where the model has only that many positions)."""
    cfg = model.lm.config
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 2048)
    pad = max(0, min(max_length, limit - model.prompts.shape[1]) - b["input_ids"].shape[1])
    return {"input_ids": F.pad(b["input_ids"], (0, pad), value=0),
            "attention_mask": F.pad(b["attention_mask"], (0, pad), value=0),
            "labels": F.pad(b["labels"], (0, pad), value=IGNORE_INDEX)}


# --- the three designs: each returns (step function, its trainable parameters) ---------------------------------

def peft_design(model: SPTModel, b: dict, device: torch.device, precision: str, max_length: int):
    """K PEFT prompt-tuning adapters on one (copied) base model, their prompts set to spt's bank."""
    from peft import PromptTuningConfig, get_peft_model

    K, n = model.K, model.prompts.shape[1]
    base = copy.deepcopy(model.lm)  # PEFT patches the model it wraps; spt's stays untouched
    pm = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n), adapter_name="p0")
    for k in range(1, K):
        pm.add_adapter(f"p{k}", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        for k in range(K):
            pm.prompt_encoder[f"p{k}"].embedding.weight.copy_(model.prompts[k])
    pm.to(device).eval()
    padded = {k: v.to(device) for k, v in pad_to_max_length(model, b, max_length).items()}

    def step() -> list[float]:
        losses = []
        with autocast(device, precision):
            for k in range(K):
                pm.set_adapter(f"p{k}")
                losses.append(pm(**padded).loss)
        sum(losses).backward()
        return [float(x.detach()) for x in losses]

    return step, [p for p in pm.parameters() if p.requires_grad]


def paper_design(model: SPTModel, b: dict, device: torch.device, precision: str, max_length: int):
    """The paper's computation on spt's model: K passes of 512-padded rows, full logits, summed losses."""
    padded = {k: v.to(device) for k, v in pad_to_max_length(model, b, max_length).items()}

    def step() -> list[float]:
        ids, mask, labels = padded["input_ids"], padded["attention_mask"], padded["labels"]
        losses = []
        with autocast(device, precision):
            E = model.embed(ids)
            for k in range(model.K):
                sp = splice(model.prompts[k:k + 1].expand(ids.shape[0], -1, -1), E, mask, labels)
                logits = model.lm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask).logits
                losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), sp.labels[:, 1:].flatten()))
        sum(losses).backward()
        return [float(x.detach()) for x in losses]

    return step, [p for p in model.parameters() if p.requires_grad]


def spt_design(model: SPTModel, b: dict, device: torch.device, precision: str, max_length: int):
    inputs = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels", "query_mask")}

    def step() -> list[float]:
        with autocast(device, precision):
            out = model(**inputs)
        out["loss"].backward()
        return []

    return step, [p for p in model.parameters() if p.requires_grad]


BUILD = {"peft": peft_design, "paper": paper_design, "spt": spt_design}


@torch.no_grad()
def spt_prompt_losses(model: SPTModel, b: dict, device: torch.device) -> list[float]:
    """spt's mean token NLL of the batch's responses under each prompt, fp32 (what PEFT's loss is per adapter)."""
    p = model.pairs(*(b[k].to(device) for k in ("input_ids", "attention_mask", "labels", "query_mask")))
    return p.nll.mean(1).tolist()


# --- FLOPs ----------------------------------------------------------------------------------------------------

def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter():
    """FlopCounterMode that also counts the CPU's fused attention kernel (torch counts only the GPU ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping)


# --- one measurement --------------------------------------------------------------------------------------------

def setup(args):
    device = pick_device(args.device)
    torch.manual_seed(0)
    lm, tok = model_and_tokenizer(args.model)
    model = SPTModel(lm, SPTConfig(K=args.K, num_virtual_tokens=args.n, lambda_ctr=0.0)).to(device)
    b = batch(tok, args.batch, args.max_length, spec=args.model, batching=args.batching)
    return device, model, b


def measure(design: str, precision: str, args) -> dict:
    """Time ``design`` at ``precision``: one warm-up step (FLOPs counted, losses kept), then --repeat steps."""
    device, model, b = setup(args)
    model.train()
    losses = spt_prompt_losses(model, b, device) if design == "spt" and precision == "fp32" else None
    step, params = BUILD[design](model, b, device, precision, args.max_length)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train_step() -> list[float]:
        out = step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    times = []
    with PeakMemory(device) as mem:
        with flop_counter() as fc:
            first = train_step()  # the losses before any update, as spt_prompt_losses sees them
        for _ in range(args.repeat):
            sync(device)
            t = time.perf_counter()
            train_step()
            sync(device)
            times.append(time.perf_counter() - t)
    return {"design": design, "precision": precision, "s_step": sorted(times)[len(times) // 2],
            "flops": fc.get_total_flops(), "mem": mem.bytes, "losses": losses if losses is not None else first}


def measure_in_child(design: str, precision: str, argv: list[str]) -> dict:
    """``measure`` in a fresh interpreter: its peak memory is its own."""
    cmd = [sys.executable, __file__, *argv, "--child", f"{design}:{precision}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{design} {precision} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def profile_spt_bf16(args, rows: int = 25) -> str:
    """torch.profiler table of spt's bf16 step (after a warm-up step): top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    device, model, b = setup(args)
    model.train()
    step, params = spt_design(model, b, device, "bf16", args.max_length)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train_step():
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", help=MODELS)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="virtual tokens per prompt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512,
                    help="data.max_length: examples are cut to it and the peft and paper designs pad to it")
    ap.add_argument("--batching", choices=("grouped", "first"), default="grouped",
                    help="grouped: a median batch of spt train's length-grouped sampler; first: the first examples")
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per design after one warm-up step")
    ap.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated subset of " + ",".join(DESIGNS))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--peak-seconds", type=float, default=2.0, help="how long each matmul-peak loop runs")
    ap.add_argument("--in-process", action="store_true",
                    help="measure every design in this process (faster; CPU peak memory then undercounts)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of spt's bf16 step")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        design, precision = args.child.split(":")
        print(RESULT + json.dumps(measure(design, precision, args)), flush=True)
        return
    parent_argv = [a for a in argv if a not in ("--profile", "--in-process")]
    device = pick_device(args.device)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if unknown := set(designs) - set(DESIGNS):
        ap.error(f"unknown design(s) {sorted(unknown)}; choose from {list(DESIGNS)}")
    _, model, b = setup(args)
    resp = int((b["labels"] != IGNORE_INDEX).sum())
    del model
    def measure_peak() -> dict[str, float]:
        return {p: matmul_peak(device, dtype, seconds=args.peak_seconds)
                for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    peak = measure_peak()
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"model={args.model} device={device} K={args.K} n={args.n} B={args.batch} "
          f"batching={args.batching} longest={b['input_ids'].shape[1]} tokens, "
          f"{int(b['attention_mask'].sum())} real tokens, {resp} response tokens, threads={threads}, "
          f"default precision={default_precision(device)}")
    print(f"memory: {'each design in its own process' if not args.in_process else 'in one process'}\n")
    results, failed = {}, {}
    for design in designs:
        for precision in PRECISIONS:
            try:
                results[design, precision] = measure(design, precision, args) if args.in_process \
                    else measure_in_child(design, precision, parent_argv)
            except RuntimeError as e:  # e.g. out of memory: report it, measure the rest
                failed[design, precision] = str(e).strip().splitlines()[-1][:150]

    after = measure_peak()  # the machine may be busier or quieter now: the better of the two is the peak
    size = 8192 if device.type == "cuda" else 2048
    print(f"matmul peak ({size}x{size}, best of before and after): "
          f"fp32 {max(peak['fp32'], after['fp32']) / 1e9:,.0f} GFLOP/s "
          f"({peak['fp32'] / 1e9:,.0f} before, {after['fp32'] / 1e9:,.0f} after), "
          f"bf16 {max(peak['bf16'], after['bf16']) / 1e9:,.0f} GFLOP/s "
          f"({peak['bf16'] / 1e9:,.0f} before, {after['bf16'] / 1e9:,.0f} after)\n")
    peak = {p: max(peak[p], after[p]) for p in peak}
    base = results.get(("peft", "fp32"))
    header = ["design", "precision", "s/step", "examples/s", "speed-up vs peft fp32", "peak memory",
              "GFLOP/step", "GFLOP/s", "% of matmul peak"]
    rows = []
    for (design, precision), r in results.items():
        rate = r["flops"] / r["s_step"]
        rows.append([design, precision, f"{r['s_step']:.3f}", f"{args.batch / r['s_step']:.2f}",
                     f"{base['s_step'] / r['s_step']:.1f}x" if base else "-", fmt_bytes(r["mem"]),
                     f"{r['flops'] / 1e9:,.1f}", f"{rate / 1e9:,.1f}", f"{100 * rate / peak[precision]:.1f}"])
    rows += [[design, precision, "failed", "-", "-", "-", "-", "-", why] for (design, precision), why in failed.items()]
    print(markdown_table(header, rows))
    print("\n(GFLOP/step: matmul and attention FLOPs the step executes, forward and backward; % of the measured "
          "matmul peak of its precision)\n")

    ratios: dict[str, float] = {}
    s = {key: r["s_step"] for key, r in results.items()}
    dflt = default_precision(device)
    if ("spt", "fp32") in s and ("peft", "fp32") in s:
        ratios["spt_fp32_vs_peft_fp32"] = s["peft", "fp32"] / s["spt", "fp32"]
    if ("spt", dflt) in s and ("peft", "fp32") in s:
        ratios["spt_default_vs_peft_fp32"] = s["peft", "fp32"] / s["spt", dflt]
    if ("spt", "bf16") in s and ("peft", "bf16") in s:
        ratios["spt_bf16_vs_peft_bf16"] = s["peft", "bf16"] / s["spt", "bf16"]
    if ("paper", "fp32") in s and ("peft", "fp32") in s:
        ratios["peft_fp32_vs_paper_fp32"] = s["paper", "fp32"] / s["peft", "fp32"]
    if ("spt", "fp32") in s and ("spt", "bf16") in s:
        ratios["spt_bf16_vs_spt_fp32"] = s["spt", "fp32"] / s["spt", "bf16"]
    for precision in PRECISIONS:
        if ("spt", precision) in results:
            r = results["spt", precision]
            ratios[f"{precision}_peak_fraction"] = r["flops"] / r["s_step"] / peak[precision]
    if ("peft", "fp32") in results and ("spt", "fp32") in results:
        a, c = results["peft", "fp32"]["losses"], results["spt", "fp32"]["losses"]
        diff = max(abs(x - y) for x, y in zip(a, c, strict=True))
        ratios["loss_max_abs_diff_spt_vs_peft_fp32"] = diff
        mem_a, mem_c = results["peft", "fp32"]["mem"], results["spt", "fp32"]["mem"]
        if mem_a and mem_c:
            ratios["peft_fp32_vs_spt_fp32_memory"] = mem_a / mem_c
        print("per-prompt LM loss, fp32: peft " + ", ".join(f"{x:.6f}" for x in a)
              + " | spt " + ", ".join(f"{x:.6f}" for x in c) + f" | max |diff| {diff:.2e}\n")
    print(ratio_lines(ratios))
    if "loss_max_abs_diff_spt_vs_peft_fp32" in ratios and ratios["loss_max_abs_diff_spt_vs_peft_fp32"] > LOSS_TOLERANCE:
        raise SystemExit(f"spt's and PEFT's fp32 losses differ by more than {LOSS_TOLERANCE}")
    if args.profile:
        print("\nprofile of spt's bf16 step:\n" + profile_spt_bf16(args))


if __name__ == "__main__":
    main()
