"""One SPT training step (forward + backward, K prompts), the paper's design against spt's, side by side.

paper: K separate forward passes (one per prompt, as PEFT prompt tuning does), every row padded to 512
       tokens, logits over the whole vocabulary at every position.
spt:   one batch of K*B rows padded to the batch's longest example, LM head at response positions only.
Both in fp32 and under bf16 autocast. Run: python bench/bench_train_step.py [--model mini|opt125m|PATH]
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from common import batch, model_and_tokenizer, timeit
from spt.config import SPTConfig
from spt.format import IGNORE_INDEX
from spt.model import SPTModel, splice


def paper_step(model: SPTModel, b: dict) -> None:
    """K passes, each row padded to 512 tokens (less the prompt where the model has only 512 positions),
    full logits; the losses' sum is back-propagated."""
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    limit = getattr(model.lm.config, "n_positions", None) or getattr(model.lm.config, "max_position_embeddings", 2048)
    pad_to = min(512, limit - model.prompts.shape[1])
    pad = pad_to - ids.shape[1]
    ids = F.pad(ids, (0, pad), value=0)
    mask = F.pad(mask, (0, pad), value=0)
    labels = F.pad(labels, (0, pad), value=IGNORE_INDEX)
    E = model.embed(ids)
    total = 0.0
    for k in range(model.K):
        sp = splice(model.prompts[k:k + 1].expand(ids.shape[0], -1, -1), E, mask, labels)
        logits = model.lm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask).logits
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), sp.labels[:, 1:].flatten())
    total.backward()


def spt_step(model: SPTModel, b: dict) -> None:
    out = model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels", "query_mask")})
    out["loss"].backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="virtual tokens per prompt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    lm, tok = model_and_tokenizer(args.model)
    model = SPTModel(lm, SPTConfig(K=args.K, num_virtual_tokens=args.n, lambda_ctr=0.0))
    b = batch(tok, args.batch)
    resp = int((b["labels"] != IGNORE_INDEX).sum())
    print(f"model={args.model} K={args.K} n={args.n} B={args.batch} longest={b['input_ids'].shape[1]} tokens, "
          f"{resp} response tokens, threads={torch.get_num_threads()}")
    rows = []
    for precision in ("fp32", "bf16"):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
        for name, fn in (("paper", paper_step), ("spt", spt_step)):
            def run(fn=fn, ctx=ctx):
                with ctx():
                    fn(model, b)
                model.zero_grad(set_to_none=True)
            rows.append((name, precision, timeit(run, repeat=args.repeat)))
    base = rows[0][2]
    print(f"\n{'design':<8}{'precision':<11}{'s/step':>9}{'speed-up vs paper fp32':>25}")
    for name, precision, s in rows:
        print(f"{name:<8}{precision:<11}{s:9.3f}{base / s:24.1f}x")


if __name__ == "__main__":
    main()
