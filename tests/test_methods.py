"""The paper's comparison arms: pt == spt(K=1, no aux losses), finetune, lora (PEFT round trip), textual, scratch."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spt.batching import EncodedDataset, collate
from spt.cli import main
from spt.config import load_config, parse_overrides
from spt.data import read_examples
from spt.methods import build_method, load_method

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")


def _train(tiny_lm_dir, synth_dir, out, *extra):
    return main(["train", "--config", TINY, "--output-dir", str(out), "--no-progress",
                 f"--model.name_or_path={tiny_lm_dir}", f"--data.train={synth_dir / 'train.jsonl'}",
                 f"--data.valid={synth_dir / 'valid.jsonl'}", *extra])


def _batch(method, synth_dir, n=6):
    ds = EncodedDataset(read_examples(synth_dir / "valid.jsonl")[:n], method.formatter())
    return method.model_inputs(collate([ds[i] for i in range(len(ds))], method.tokenizer.pad_token_id), "cpu")


def test_pt_equals_spt_with_one_prompt_and_no_aux_losses(tiny_lm_dir, synth_dir):
    common = [f"--model.name_or_path={tiny_lm_dir}", "--spt.num_virtual_tokens=3"]
    pt = load_config(TINY, parse_overrides(["--method=pt", *common]))
    assert (pt.spt.K, pt.spt.lambda_sel, pt.spt.lambda_fus, pt.spt.lambda_ctr) == (1, 0.0, 0.0, 0.0)
    spt1 = load_config(TINY, parse_overrides(["--method=spt", "--spt.K=1", "--spt.lambda_sel=0", "--spt.lambda_fus=0",
                                              "--spt.lambda_ctr=0", *common]))
    a, b = build_method(pt), build_method(spt1)
    batch = _batch(a, synth_dir)
    out_a, out_b = a.model(**batch), b.model(**batch)
    for key in ("loss", "llm", "sel", "fus", "ctr"):
        assert out_a[key].item() == pytest.approx(out_b[key].item(), abs=1e-6)
    assert out_a["loss"].item() == pytest.approx(out_a["llm"].item(), abs=1e-6)


def test_finetune_changes_lm_weights(tiny_lm_dir, synth_dir, tmp_path):
    out = tmp_path / "ft"
    assert _train(tiny_lm_dir, synth_dir, out, "--method=finetune", "--train.lr=1e-3") == 0
    ckpt = out / "checkpoint-last"
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    base, tuned = load_file(tiny_lm_dir / "model.safetensors"), load_file(ckpt / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) > len(base) // 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # a plain HuggingFace folder
    gens = load_method(out).generate(read_examples(synth_dir / "valid.jsonl")[:2],
                                     load_config(ckpt / "config.yaml").generate)
    assert len(gens) == 2 and gens[0].prompt is None and gens[0].ref_nll > 0


def test_lora_adapter_round_trips_through_peft(tiny_lm_dir, synth_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert _train(tiny_lm_dir, synth_dir, out, "--method=lora", "--baseline.lora_r=4", "--train.lr=1e-2",
                  "--baseline.lora_target_modules=[c_attn]") == 0
    ckpt = out / "checkpoint-last"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    ours = load_method(out)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), str(ckpt)).eval()
    ids = torch.tensor([[5, 17, 33, 8, 90, 4]])
    with torch.no_grad():
        a = ours.model.lm(input_ids=ids).logits
        b = peft(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter learned something


def test_textual_generates_without_training(tiny_lm_dir, synth_dir, tmp_path):
    out = tmp_path / "textual"
    assert _train(tiny_lm_dir, synth_dir, out, "--method=textual",
                  "--data.instruction=reply as the person described .") == 0
    assert (out / "checkpoint-best" / "config.yaml").is_file()
    assert not (out / "checkpoint-best" / "model.safetensors").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 0 and summary["best_val_loss"] > 0
    assert main(["generate", str(out), "--data", str(synth_dir / "valid.jsonl"), "--limit", "3", "--no-progress",
                 "--generate.max_new_tokens=5"]) == 0
    rows = (out / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and json.loads(rows[0])["prompt"] is None
    method = load_method(out)
    ids = method.formatter().encode_prompt(("i ski.",), ("hi",))
    assert method.tokenizer.decode(ids, skip_special_tokens=True).startswith("reply as the person described .")


def test_scratch_lm_then_spt_on_top(synth_dir, tmp_path):
    base = tmp_path / "base"
    assert main(["train", "--config", TINY, "--output-dir", str(base), "--no-progress", "--method=finetune",
                 "--model.init=scratch", "--model.scratch.n_layer=1", "--model.scratch.n_embd=32",
                 "--model.scratch.vocab_size=300", "--baseline.loss_on=all", "--train.lr=3e-3",
                 f"--data.train={synth_dir / 'train.jsonl'}", f"--data.valid={synth_dir / 'valid.jsonl'}"]) == 0
    summary = json.loads((base / "train_summary.json").read_text())
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert _train(base / "checkpoint-best", synth_dir, tmp_path / "spt") == 0
    assert load_file(tmp_path / "spt" / "checkpoint-last" / "model.safetensors")["prompts"].shape == (2, 2, 32)


def test_scratch_needs_finetune():
    from spt.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.init=scratch needs method=finetune"):
        load_config(TINY, parse_overrides(["--model.init=scratch"]))
