"""Generation with per-row soft prompts: one generate call per batch (spt) against one call per distinct
selected prompt over the whole batch (the paper's code), greedy, 32 new tokens, side by side.

Run: python bench/bench_generate.py [--model mini|PATH] [--batch 32]
"""

from __future__ import annotations

import argparse

import torch

from common import examples, model_and_tokenizer, timeit
from spt.config import GenerateConfig, SPTConfig
from spt.format import DialogueFormatter
from spt.generate import generate_spt, left_pad
from spt.model import SPTModel, splice


def paper_generate(model, tok, fmt, exs, cfg: GenerateConfig) -> None:
    """For each distinct selected prompt, run the whole batch with that prompt; keep the rows that chose it."""
    ids, mask = left_pad([fmt.encode_prompt(e.persona, e.context, reserve=cfg.max_new_tokens) for e in exs],
                         tok.pad_token_id)
    E = model.embed(ids)
    k = model.select(model.scores(*model.query(ids, mask, E)))
    for p in k.unique().tolist():
        sp = splice(model.prompts[p:p + 1].expand(len(exs), -1, -1), E, mask)
        model.lm.generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                          max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--K", type=int, default=4)
    args = ap.parse_args()
    lm, tok = model_and_tokenizer(args.model)
    torch.manual_seed(0)
    model = SPTModel(lm, SPTConfig(K=args.K, num_virtual_tokens=8, prompt_init="random")).eval()
    with torch.no_grad():
        model.retriever.normalizer.weight.normal_()  # spread the selections over the prompts, as a trained bank does
    fmt = DialogueFormatter(tok, 512)
    exs = examples(args.batch)
    cfg = GenerateConfig(max_new_tokens=32, batch_size=args.batch)
    with torch.no_grad():
        picked = generate_spt(model, tok, fmt, exs, cfg, score_references=False)
        distinct = len({g.prompt for g in picked})
        t_paper = timeit(lambda: paper_generate(model, tok, fmt, exs, cfg), repeat=3)
        t_spt = timeit(lambda: generate_spt(model, tok, fmt, exs, cfg, score_references=False), repeat=3)
    print(f"model={args.model} batch={args.batch} K={args.K}: {distinct} distinct prompts selected")
    print(f"\n{'design':<32}{'s/batch':>9}{'speed-up':>10}")
    print(f"{'paper (one call per prompt)':<32}{t_paper:9.3f}{1.0:9.1f}x")
    print(f"{'spt (one call, per-row prompts)':<32}{t_spt:9.3f}{t_paper / t_spt:9.1f}x")


if __name__ == "__main__":
    main()
