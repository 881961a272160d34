"""The contrastive loss's share of an SPT training step (the paper's recipe, lambda_ctr 0.4), batch 32.

What the contrastive term costs per batch, as ``spt train`` runs it:
  similarity  ``PersonaSimilarity.matrix``: sentence BLEU of every persona pair i < j of the batch, on the CPU,
              before the forward. cold: a fresh cache (every pair new: the first epoch); warm: the same batch
              again (later epochs; personas repeat across a dialogue's turns, so the cache also helps within one).
  loss        ``contrastive_targets`` + ``contrastive_loss`` on the (K, B) retriever scores, forward and backward.
against one whole training step at spt's default precision (forward, backward, AdamW) with the similarity
computed first, as in the training loop. Output: a Markdown table and ``name: number`` share lines.

Run: python bench/bench_contrastive.py [--model mini|opt125m|tiny|PATH] [--batch 32] [--K 4]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from common import MODELS, batch_and_dataset, markdown_table, model_and_tokenizer, pick_device, ratio_lines, sync
from spt import losses
from spt.batching import PersonaSimilarity
from spt.config import SPTConfig
from spt.model import SPTModel

KEYS = ("input_ids", "attention_mask", "labels", "query_mask")


def best_of(fn, repeat: int) -> float:
    """Fastest of ``repeat`` calls, seconds (for sub-millisecond work on a shared machine)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", help=MODELS)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="virtual tokens per prompt")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="timed training steps after one warm-up step")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args(argv)
    from bench_train_step import autocast, default_precision

    device = pick_device(args.device)
    precision = default_precision(device)
    lm, tok = model_and_tokenizer(args.model)
    b, ds = batch_and_dataset(tok, args.batch, args.max_length, spec=args.model)
    model = SPTModel(lm, SPTConfig(K=args.K, num_virtual_tokens=args.n, recipe="paper")).to(device).train()
    assert model.cfg.lambda_ctr > 0
    inputs = {k: b[k].to(device) for k in KEYS}
    ids = b["persona_ids"]
    B = ids.shape[0]

    # the similarity matrix: cold (every pair new) and warm (cached)
    def cold():
        return PersonaSimilarity(ds.personas).matrix(ids)

    t_cold = min(best_of(cold, 1), best_of(cold, 1))
    sim = PersonaSimilarity(ds.personas)
    sim.matrix(ids)
    t_warm = best_of(lambda: sim.matrix(ids), 5)

    # the loss itself, forward and backward, on scores shaped like the model's
    S = torch.randn(args.K, B, device=device, requires_grad=True)
    targets_sim = sim.matrix(ids).to(device)

    def ctr():
        loss = losses.contrastive_loss(S, losses.contrastive_targets(targets_sim, model.cfg.ctr_bleu_threshold))
        loss.backward()
        sync(device)

    ctr()
    t_loss = best_of(ctr, 20)

    # the whole training step, similarity (cold: a fresh cache every step) included
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctx = (lambda: autocast(device, precision)) if precision == "bf16" else contextlib.nullcontext

    def step():
        persona_sim = PersonaSimilarity(ds.personas).matrix(ids).to(device)
        with ctx():
            out = model(**inputs, persona_sim=persona_sim)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    step()
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    t_step = sorted(times)[len(times) // 2]

    print(f"model={args.model} device={device} K={args.K} B={B} longest={b['input_ids'].shape[1]} tokens, "
          f"{len(set(ids.tolist()))} distinct personas, {B * (B - 1) // 2} pairs, step at {precision}\n")
    rows = [["persona similarity, cold cache (sentence BLEU of every pair)", f"{1e3 * t_cold:.1f}",
             f"{100 * t_cold / t_step:.2f}"],
            ["persona similarity, warm cache", f"{1e3 * t_warm:.2f}", f"{100 * t_warm / t_step:.3f}"],
            ["contrastive loss forward + backward", f"{1e3 * t_loss:.2f}", f"{100 * t_loss / t_step:.3f}"],
            [f"whole training step ({precision}, cold similarity included)", f"{1e3 * t_step:.0f}", "100"]]
    print(markdown_table(["part", "ms", "% of step"], rows) + "\n")
    print(ratio_lines({"contrastive_share_cold": (t_cold + t_loss) / t_step,
                       "contrastive_share_warm": (t_warm + t_loss) / t_step,
                       "contrastive_loss_only_share": t_loss / t_step,
                       "train_step_s": t_step}))


if __name__ == "__main__":
    main()
