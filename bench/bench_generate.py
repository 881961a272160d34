"""Greedy generation with one selected soft prompt per row: spt's one ``generate`` call per batch against PEFT's
own ``generate`` once per adapter over the whole batch (the paper's code path), at K = 4 and K = 8, fp32.

Selections are spread evenly over the K prompts (row i gets prompt i % K) through the hook generation uses:
``generate_spt`` picks prompts with ``model.select(S, noise, generator)``, and ``spread_selection`` replaces that
method on the model instance. The prompts are random (``prompt_init: random``), so they change the outputs.

designs (rows x 32 new tokens, left-padded batch of --batch dialogues):
  spt           ``spt.generate.generate_spt``: one call, every row with its own prompt spliced in.
  peft cached   K ``PeftModel.generate`` calls (one per adapter, ``set_adapter``) over the whole batch, each row
                kept from its prompt's call: the paper's code path, PEFT's default (KV cache). With peft 0.21.2 on
                transformers 5 its outputs are wrong after the first token (PEFT re-inserts the virtual tokens
                at every cached step; see spt/export.py); the rows that differ from spt are counted. It can
                also raise: on OPT for any left-padded batch (the re-inserted prompt no longer matches the
                positions OPT derives from the attention mask), on GPT-2 once the n + 1 positions every step
                adds run past n_positions; the table then says so.
  peft no cache PEFT with ``use_cache=False`` (correct, slow), one row at a time (unpadded: PEFT prepends the
                prompt before any left padding and ignores position ids, which shifts GPT-2's positions), run
                once: the reference. spt's output must equal it token for token (compared as decoded text) on
                every checked row (--check-rows, default all); the script fails otherwise.
  paper on spt  the paper's loop without PEFT: one ``lm.generate`` per prompt over the whole batch with spt's
                splice (correct outputs): the cost of the per-adapter loop itself.

Output: a Markdown table per K, then ``name: number`` lines (speed-ups, tokens/s, mismatching rows).
tokens/s counts rows x max new tokens per second (generation runs until every row stops).

Run: python bench/bench_generate.py [--model mini|opt125m|tiny|PATH] [--batch 32] [--K 4,8] [--check-rows N]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import MODELS, examples, markdown_table, model_and_tokenizer, pick_device, ratio_lines, sync, timeit
from spt.config import GenerateConfig, SPTConfig
from spt.format import DialogueFormatter
from spt.generate import generate_spt, generation_kwargs, left_pad
from spt.model import SPTModel, splice


def spread_selection(model: SPTModel) -> None:
    """Row i of every batch selects prompt i % K, whatever the retriever scores (the hook: ``model.select``)."""
    def select(S: torch.Tensor, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.arange(S.shape[1], device=S.device) % model.K

    model.select = select


def peft_bank(model: SPTModel, device: torch.device):
    """One PEFT model (on a copy of the base: PEFT patches the model it wraps) with K prompt-tuning adapters
    p0..p{K-1} whose prompt embeddings are spt's bank."""
    from peft import PromptTuningConfig, get_peft_model

    n = model.prompts.shape[1]
    pm = get_peft_model(copy.deepcopy(model.lm), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
                        adapter_name="p0")
    for k in range(1, model.K):
        pm.add_adapter(f"p{k}", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        for k in range(model.K):
            pm.prompt_encoder[f"p{k}"].embedding.weight.copy_(model.prompts[k])
    return pm.to(device).eval()


def encode(fmt: DialogueFormatter, exs, cfg: GenerateConfig) -> list[list[int]]:
    return [fmt.encode_prompt(e.persona, e.context, reserve=cfg.max_new_tokens) for e in exs]


def decode(tok, new_tokens: torch.Tensor) -> list[str]:
    return tok.batch_decode(new_tokens, skip_special_tokens=True)


def peft_loop(pm, tok, rows: list[list[int]], K: int, kw: dict, device, use_cache: bool = True) -> list[str]:
    """The paper's path: per adapter, PEFT's generate over the whole left-padded batch; row i from adapter i % K."""
    ids, mask = left_pad(rows, tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    out: list[str] = [""] * len(rows)
    for k in range(K):
        pm.set_adapter(f"p{k}")
        seqs = pm.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **kw)
        texts = decode(tok, seqs[:, ids.shape[1]:])
        for i in range(k, len(rows), K):
            out[i] = texts[i]
    return out


def peft_reference(pm, tok, rows: list[list[int]], K: int, kw: dict, device) -> list[str]:
    """PEFT without its cache, one unpadded row at a time with its prompt's adapter: PEFT's correct output."""
    out = []
    for i, row in enumerate(rows):
        pm.set_adapter(f"p{i % K}")
        ids = torch.tensor([row], device=device)
        seqs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
        out += decode(tok, seqs[:, ids.shape[1]:])
    return out


def paper_on_spt(model: SPTModel, tok, rows: list[list[int]], kw: dict, device) -> list[str]:
    """The per-prompt loop on spt's model: one lm.generate per prompt over the whole batch, spt's splice."""
    ids, mask = left_pad(rows, tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    E = model.embed(ids)
    k = model.select(model.scores(*model.query(ids, mask, E)))
    out: list[str] = [""] * len(rows)
    for p in k.unique().tolist():
        sp = splice(model.prompts[p:p + 1].expand(len(rows), -1, -1), E, mask)
        texts = decode(tok, model.lm.generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask, **kw))
        for i in (k == p).nonzero().flatten().tolist():
            out[i] = texts[i]
    return out


def run_k(K: int, lm, tok, exs, args, device) -> tuple[list[list], dict[str, float], list[str]]:
    torch.manual_seed(0)
    model = SPTModel(lm, SPTConfig(K=K, num_virtual_tokens=args.n, prompt_init="random"), seed=0).to(device).eval()
    spread_selection(model)
    pm = peft_bank(model, device)
    fmt = DialogueFormatter(tok, args.max_length)
    cfg = GenerateConfig(max_new_tokens=args.new_tokens, batch_size=len(exs))
    kw = generation_kwargs(cfg, tok)
    rows = encode(fmt, exs, cfg)
    slots = len(rows) * cfg.max_new_tokens
    problems: list[str] = []
    with torch.no_grad():
        picked = generate_spt(model, tok, fmt, exs, cfg, score_references=False)
        if [g.prompt for g in picked] != [i % K for i in range(len(exs))]:
            problems.append(f"K={K}: the selection hook did not take effect")
        spt_out = [g.raw for g in picked]
        t_spt = timeit(lambda: generate_spt(model, tok, fmt, exs, cfg, score_references=False), args.repeat,
                       device=device)
        try:
            cached = peft_loop(pm, tok, rows, K, kw, device)
            t_cached = timeit(lambda: peft_loop(pm, tok, rows, K, kw, device), args.repeat, device=device)
            cached_error = None
        except (RuntimeError, IndexError) as e:  # PEFT's re-inserted prompt runs past the cached positions
            cached, t_cached, cached_error = None, None, f"{type(e).__name__}: {e}".splitlines()[0][:120]
        paper = paper_on_spt(model, tok, rows, kw, device)
        t_paper = timeit(lambda: paper_on_spt(model, tok, rows, kw, device), args.repeat, device=device)
        check = len(rows) if args.check_rows is None else min(args.check_rows, len(rows))
        sync(device)
        t0 = time.perf_counter()
        reference = peft_reference(pm, tok, rows[:check], K, kw, device)
        sync(device)
        t_ref = time.perf_counter() - t0
    wrong = [i for i in range(check) if spt_out[i] != reference[i]]
    if wrong:
        problems.append(f"K={K}: spt differs from PEFT without cache on rows {wrong[:10]} "
                        f"(first: spt {spt_out[wrong[0]]!r} vs PEFT {reference[wrong[0]]!r})")
    cached_wrong = None if cached is None else sum(a != b for a, b in zip(cached, spt_out, strict=True))
    paper_wrong = sum(a != b for a, b in zip(paper, spt_out, strict=True))
    table = [
        ["spt (one call, per-row prompts)", 1, f"{t_spt:.3f}", f"{slots / t_spt:,.0f}", "1.0x",
         f"0 / {len(rows)}"],
        ["peft cached (one call per adapter)", K, f"{t_cached:.3f}", f"{slots / t_cached:,.0f}",
         f"{t_cached / t_spt:.1f}x", f"{cached_wrong} / {len(rows)}"] if cached_error is None else
        ["peft cached (one call per adapter)", K, "fails", "-", "-", f"raises {cached_error}"],
        [f"peft no cache, row by row ({check} rows, once)", check, f"{t_ref:.3f}",
         f"{check * args.new_tokens / t_ref:,.0f}", f"{t_ref * len(rows) / check / t_spt:.1f}x",
         f"{len(wrong)} / {check}"],
        ["paper loop on spt's model (one call per prompt)", K, f"{t_paper:.3f}", f"{slots / t_paper:,.0f}",
         f"{t_paper / t_spt:.1f}x", f"{paper_wrong} / {len(rows)}"],
    ]
    ratios = {f"spt_vs_peft_cached_k{K}": t_cached / t_spt} if cached_error is None else {}
    ratios.update({f"spt_vs_peft_nocache_k{K}": t_ref * len(rows) / check / t_spt,
                   f"spt_vs_paper_loop_k{K}": t_paper / t_spt,
                   f"spt_tokens_per_s_k{K}": slots / t_spt})
    if cached_error is None:
        ratios.update({f"peft_cached_tokens_per_s_k{K}": slots / t_cached,
                       f"peft_cached_mismatched_rows_k{K}": cached_wrong})
    else:
        ratios[f"peft_cached_fails_k{K}"] = 1
    ratios[f"spt_vs_peft_nocache_mismatched_rows_k{K}"] = len(wrong)
    return table, ratios, problems


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", help=MODELS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--K", default="4,8", help="comma-separated prompt-bank sizes")
    ap.add_argument("--n", type=int, default=8, help="virtual tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512, help="data.max_length (inputs are cut to fit)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (median) after one warm-up run")
    ap.add_argument("--check-rows", type=int, default=None,
                    help="rows checked against PEFT without cache, one at a time (default: all; slow on big models)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    lm, tok = model_and_tokenizer(args.model)
    lm.to(device)
    exs = examples(args.batch, args.model)
    print(f"model={args.model} device={device} batch={len(exs)} new tokens={args.new_tokens} n={args.n} fp32, "
          f"selections spread evenly (row i -> prompt i % K)\n")
    ratios: dict[str, float] = {}
    problems: list[str] = []
    header = ["design", "generate calls", "s/batch", "tokens/s", "time vs spt", "rows differing from spt"]
    for K in (int(x) for x in args.K.split(",")):
        table, r, p = run_k(K, lm, tok, exs, args, device)
        print(f"K={K}\n\n" + markdown_table(header, table) + "\n")
        ratios.update(r)
        problems += p
    print("(peft no cache: timed once over the checked rows; 'time vs spt' scales it to the whole batch)\n")
    print(ratio_lines(ratios))
    if problems:
        raise SystemExit("\n".join(problems))


if __name__ == "__main__":
    main()
