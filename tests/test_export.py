"""`spt export RUN --to peft OUT` and `spt.init_from_peft`: real tiny runs, real PEFT adapters, compared by value."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_lm, tiny_train_args
from spt.cli import main
from spt.format import IGNORE_INDEX

ATOL = 1e-5


def _train(tiny_lm_dir, synth_dir, out, *extra) -> None:
    assert main(tiny_train_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=2", *extra)) == 0


def _export(run, out, *extra) -> int:
    return main(["export", str(run), "--to", "peft", str(out), *extra])


@pytest.fixture(scope="module")
def spt_run(tiny_lm_dir, synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("spt") / "run"
    _train(tiny_lm_dir, synth_dir, run)
    return run


@pytest.fixture(scope="module")
def spt_export(spt_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    assert _export(spt_run, out) == 0
    return out


@pytest.fixture(scope="module")
def spt_method(spt_run):
    from spt.methods import load_method

    return load_method(spt_run, device="cpu")


def _base(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


def _peft(tiny_lm_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(tiny_lm_dir), str(adapter)).eval()


def _batch(method, synth_dir, count: int):
    """The first ``count`` validation examples as spt encodes them for training (right-padded)."""
    from spt.batching import EncodedDataset, collate
    from spt.data import read_examples

    ds = EncodedDataset(read_examples(synth_dir / "valid.jsonl")[:count], method.formatter())
    return collate([ds[i] for i in range(count)], method.tokenizer.pad_token_id)


def _spt_full_logits(model, k: int, ids, mask):
    """spt's logits for prompt k at every position of the spliced rows (prompt right before the first real token,
    positions counting real tokens), with the text positions only: (B, T, V)."""
    from spt.model import splice

    n = model.prompts.shape[1]
    sp = splice(model.prompts[[k] * ids.shape[0]], model.embed(ids), mask)
    logits = model.lm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                      position_ids=sp.position_ids).logits
    lead = (mask.cumsum(1) == 0).sum(1)  # left padding: the text starts after pad + prompt
    return torch.stack([torch.cat([logits[b, :lead[b]], logits[b, lead[b] + n:]]) for b in range(ids.shape[0])])


# --- export ---------------------------------------------------------------------------------------

def test_export_writes_peft_adapters_that_give_spts_logits(spt_run, spt_export, spt_method, tiny_lm_dir, synth_dir):
    from peft import PeftModel

    model = spt_method.model
    K, n, d = model.prompts.shape
    assert (K, n, d) == (2, 2, 32)
    assert sorted(p.name for p in spt_export.iterdir()) == ["README.md", "prompt-0", "prompt-1",
                                                           "retriever.safetensors", "spt_export.json"]
    batch = _batch(spt_method, synth_dir, 3)
    trained = load_file(spt_run / "checkpoint-best" / "model.safetensors")["prompts"]
    for k in range(K):
        folder = spt_export / f"prompt-{k}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"], config["token_dim"]) == \
            ("PROMPT_TUNING", "CAUSAL_LM", n, d)
        assert config["base_model_name_or_path"] == str(tiny_lm_dir)
        assert torch.equal(load_file(folder / "adapter_model.safetensors")["prompt_embeddings"], trained[k])
        peft_model = _peft(tiny_lm_dir, folder)
        assert isinstance(peft_model, PeftModel)
        with torch.no_grad():
            for b in range(3):  # one unpadded example at a time
                T = int(batch["attention_mask"][b].sum())
                ids, mask, labels = (batch[key][b:b + 1, :T] for key in ("input_ids", "attention_mask", "labels"))
                got = peft_model(input_ids=ids, attention_mask=mask).logits  # (1, n + T, V)
                assert got.shape[1] == n + T
                # spt's own training/evaluation path: the LM head at response positions only
                spt_resp, targets = model.pair_logits(torch.tensor([k]), ids, mask, labels)
                at = (labels[0, 1:] != IGNORE_INDEX).nonzero().flatten()  # position t predicts token t + 1
                assert len(at) == len(targets) > 0
                torch.testing.assert_close(got[0, n + at], spt_resp, atol=ATOL, rtol=0)
                # ... and every real position
                torch.testing.assert_close(got[:, n:], _spt_full_logits(model, k, ids, mask), atol=ATOL, rtol=0)
            # a right-padded batch: the same logits at every real position
            ids, mask = batch["input_ids"], batch["attention_mask"]
            got = peft_model(input_ids=ids, attention_mask=mask).logits[:, n:]
            want = _spt_full_logits(model, k, ids, mask)
            real = mask.bool()
            torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
        other = model.pair_logits(torch.tensor([1 - k]), ids[:1], mask[:1], batch["labels"][:1])[0]
        assert not torch.allclose(other, model.pair_logits(torch.tensor([k]), ids[:1], mask[:1],
                                                           batch["labels"][:1])[0], atol=1e-3)  # prompts differ


def test_peft_generation_matches_spt_for_one_dialogue_without_its_cache(spt_export, spt_method, tiny_lm_dir,
                                                                        synth_dir):
    """Greedy generation of one (unpadded) dialogue through PEFT gives spt's tokens and every step's logits with
    use_cache=False. With its KV cache, PEFT 0.21.2 on transformers 5.x looks for the cache under its old name
    (past_key_values; now ``cache``), takes every step for the first and inserts the virtual tokens again: only
    the first new token's logits are right. The model card says so; this test notices when PEFT fixes it."""
    from spt.config import GenerateConfig
    from spt.data import read_examples
    from spt.generate import generate_spt
    from spt.model import splice

    model, tok = spt_method.model, spt_method.tokenizer
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": None,
          "output_logits": True, "return_dict_in_generate": True}
    for example in read_examples(synth_dir / "valid.jsonl")[:2]:
        chosen = generate_spt(model, tok, spt_method.formatter(), [example], GenerateConfig(max_new_tokens=6, stop=[]),
                              score_references=False)[0]
        ids = torch.tensor([spt_method.formatter().encode_prompt(example.persona, example.context, reserve=6)])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            sp = splice(model.prompts[[chosen.prompt]], model.embed(ids), mask)  # as spt.generate does
            want = model.lm.generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask, **kw)
            peft_model = _peft(tiny_lm_dir, spt_export / f"prompt-{chosen.prompt}")
            got = peft_model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
            cached = peft_model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert tok.decode(want.sequences[0], skip_special_tokens=True).strip() == chosen.raw.strip()
        assert torch.equal(got.sequences[:, :ids.shape[1]], ids)
        assert torch.equal(got.sequences[:, ids.shape[1]:], want.sequences) and want.sequences.shape[1] == 6
        for a, b in zip(got.logits, want.logits, strict=True):  # every step's logits, not only the argmax
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        torch.testing.assert_close(cached.logits[0], want.logits[0], atol=ATOL, rtol=0)
        assert not torch.allclose(cached.logits[1], want.logits[1], atol=1e-3), \
            "PEFT's cached prompt-tuning generation is right now: update the model card (spt.export.model_card)"


@pytest.mark.parametrize("family, left_padding_agrees", [("gpt2", False), ("llama", False), ("opt", True)])
def test_where_peft_places_the_prompt(family, left_padding_agrees, tmp_path):
    """PEFT prepends the prompt before any padding and drops position ids; spt splices it before the first real
    token and counts real tokens. Unpadded and right-padded rows agree for every family; left-padded rows only
    where the model numbers positions from the attention mask (OPT)."""
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    from spt.config import SPTConfig
    from spt.model import SPTModel

    lm = make_tiny_lm(family, 64, eos_id=0)
    lm.save_pretrained(tmp_path / "base")
    spt = SPTModel(lm, SPTConfig(K=1, num_virtual_tokens=3), seed=1)
    peft_model = get_peft_model(make_tiny_lm(family, 64, eos_id=0),
                                PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(spt.prompts[0])
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(make_tiny_lm(family, 64, eos_id=0), str(tmp_path / "adapter")).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (2, 7), generator=g)
    lengths = torch.tensor([7, 4])
    right = (torch.arange(7) < lengths[:, None]).long()
    left = right.flip(1)
    with torch.no_grad():
        for mask, agrees in ((torch.ones(2, 7, dtype=torch.long), True), (right, True), (left, left_padding_agrees)):
            got = peft_model(input_ids=ids, attention_mask=mask).logits[:, 3:]
            want = _spt_full_logits(spt, 0, ids, mask)
            real = mask.bool()
            close = torch.allclose(got[real], want[real], atol=ATOL, rtol=0)
            assert close == agrees, (family, mask.tolist(), (got[real] - want[real]).abs().max())
            assert torch.allclose(got[0], want[0], atol=ATOL, rtol=0)  # the unpadded row always agrees


def test_retriever_file_and_settings_reproduce_spts_routing(spt_run, spt_export, spt_method, tiny_lm_dir,
                                                            synth_dir):
    from spt.data import read_examples
    from spt.export import load_exported

    saved = load_file(spt_run / "checkpoint-best" / "model.safetensors")
    retriever = load_file(spt_export / "retriever.safetensors")
    expected = {k for k in saved if k.startswith("retriever.")} | {"selection_keys"}
    assert set(retriever) == expected and {"retriever.center", "retriever.keys"} <= expected  # routed recipe
    for name in expected - {"selection_keys"}:
        assert torch.equal(retriever[name], saved[name]), name
    assert torch.equal(retriever["selection_keys"], saved["retriever.keys"])
    info = json.loads((spt_export / "spt_export.json").read_text())
    assert (info["K"], info["n"], info["d"], info["method"], info["base_model"]) == (2, 2, 32, "spt",
                                                                                      str(tiny_lm_dir))
    assert info["adapters"] == ["prompt-0", "prompt-1"] and info["spt_version"] == __import__("spt").__version__
    assert info["selection"]["keys"] == "kmeans" and info["selection"]["center_features"] is True
    assert info["selection"]["query"] == "embeddings" and info["selection"]["rule"] == "argmax"
    assert info["training_steps"] == 2 and info["data"]["train"] == str(synth_dir / "train.jsonl")
    assert info["input_format"]["max_length"] == 160

    bank = load_exported(spt_export, _base(tiny_lm_dir))
    assert torch.equal(bank.model.prompts, spt_method.model.prompts)
    batch = _batch(spt_method, synth_dir, 8)
    with torch.no_grad():
        want = spt_method.model.scores(*spt_method.model.query(batch["input_ids"], batch["query_mask"]))
        got = bank.model.scores(*bank.model.query(batch["input_ids"], batch["query_mask"]))
    assert torch.equal(got, want)
    tok = spt_method.tokenizer
    for ex in read_examples(synth_dir / "valid.jsonl")[:6]:
        k, scores = bank.select(tok, ex.persona, ex.context)
        ids = torch.tensor([spt_method.formatter().encode_prompt(ex.persona, ex.context)])
        with torch.no_grad():
            S = spt_method.model.scores(*spt_method.model.query(ids, torch.ones_like(ids)))[:, 0]
        assert k == int(S.argmax()) and scores == pytest.approx(S.tolist(), abs=0)


def test_model_card(spt_run, spt_export, spt_method, tiny_lm_dir, synth_dir, tmp_path):
    card = (spt_export / "README.md").read_text()
    summary = json.loads((spt_run / "train_summary.json").read_text())
    best = min(summary["history"], key=lambda h: h["loss"])
    assert f"base_model: {tiny_lm_dir}" in card and f"| base model | `{tiny_lm_dir}` |" in card
    assert "| prompts (K) | 2: `prompt-0` ... `prompt-1` |" in card and "| virtual tokens per prompt (n) | 2 |" in card
    assert f"| training data | {synth_dir / 'train.jsonl'} |" in card and "| training steps | 2 |" in card
    assert f"checkpoint-best, step {best['step']}, validation loss {best['loss']:.4g}" in card
    assert "has not been evaluated" in card
    assert 'PeftModel.from_pretrained(base, "OUT/prompt-0")' in card and "load_exported" in card
    assert "Left-padded batches" in card and "use_cache=False" in card
    # the card's recipe for the input gives the ids spt trains and generates on
    assert "tokenizer(tokenizer.bos_token + text, return_tensors=\"pt\", add_special_tokens=False)" in card
    from spt.data import read_examples
    from spt.format import DialogueFormatter, render_text

    tok = spt_method.tokenizer
    untruncated = DialogueFormatter(tok, max_length=10_000)  # spt cuts inputs to data.max_length; this card's text not
    for ex in read_examples(synth_dir / "valid.jsonl")[:4]:
        text = render_text(ex.persona, ex.context)
        assert text.startswith("given persona: ") and text.endswith(" R:") and "; context: " in text
        assert tok(tok.bos_token + text, add_special_tokens=False)["input_ids"] == \
            untruncated.encode_prompt(ex.persona, ex.context)
    assert "prompt 1 of 2" in (spt_export / "prompt-1" / "README.md").read_text().lower()

    evaluated = tmp_path / "run"
    shutil.copytree(spt_run, evaluated)
    (evaluated / "eval").mkdir(exist_ok=True)
    (evaluated / "eval" / "metrics.json").write_text(json.dumps(
        {"n": 12, "f1": 17.25, "bleu": 1.5, "ppl": 123.4, "meteor": None, "provenance": {"data": "/d/test.jsonl"}}))
    assert _export(evaluated, tmp_path / "out", "--checkpoint", "last") == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| evaluation | data | n | f1 | bleu | ppl |" in card
    assert "| eval/metrics.json | /d/test.jsonl | 12 | 17.25 | 1.5 | 123.4 |" in card
    assert "checkpoint-last, step 2," in card
    info = json.loads((tmp_path / "out" / "spt_export.json").read_text())
    assert info["checkpoint"].endswith("checkpoint-last") and info["checkpoint_step"] == 2


def test_export_refuses_a_non_empty_folder_unless_overwrite(spt_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _export(spt_run, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: not empty; pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _export(spt_run, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir())[:2] == ["README.md", "prompt-0"] and not (out / "keep.txt").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(spt_run, empty) == 0 and (empty / "prompt-1" / "adapter_model.safetensors").is_file()

    assert _export(spt_run, spt_run, "--overwrite") == 2  # the run itself is never replaced
    assert "holds the run being exported" in capsys.readouterr().err
    assert (spt_run / "checkpoint-best" / "model.safetensors").is_file()
    assert _export(tmp_path / "nowhere", tmp_path / "o2") == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err
    assert main(["export", str(spt_run), "--to", "peft", str(tmp_path / "o3"), "--spt.K=3"]) == 2
    assert "only --model.name_or_path" in capsys.readouterr().err


def test_export_is_all_or_nothing_and_takes_only_prompt_runs(spt_run, tiny_lm_dir, synth_dir, tmp_path,
                                                              monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "out"
    assert _export(spt_run, out) == 0
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(args[1]))

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full_disk)
        assert _export(spt_run, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: cannot write the export (No space left on device)" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left

    (tmp_path / "file").write_text("x")
    assert _export(spt_run, tmp_path / "file") == 2
    assert "file: is a file; give a folder" in capsys.readouterr().err
    textual = tmp_path / "textual"
    assert main(tiny_train_args(tiny_lm_dir, synth_dir, textual, "--method=textual")) == 0
    assert _export(textual, tmp_path / "o") == 2
    assert "a textual run has no prompt bank; spt export takes spt and pt runs" in capsys.readouterr().err


def test_export_names_a_missing_base_model(spt_run, tmp_path, capsys):
    moved = tmp_path / "gone"
    assert _export(spt_run, tmp_path / "out", f"--model.name_or_path={moved}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(moved) in err and not (tmp_path / "out").exists()


# --- import ---------------------------------------------------------------------------------------

@pytest.fixture
def bank_at_start(monkeypatch):
    """The prompt bank of every fresh run right after SPTMethod.prepare, i.e. what step 1 starts from."""
    from spt.methods import SPTMethod

    banks: list[torch.Tensor] = []
    prepare = SPTMethod.prepare

    def spy(self, *args, **kwargs):
        prepare(self, *args, **kwargs)
        banks.append(self.model.prompts.detach().clone())

    monkeypatch.setattr(SPTMethod, "prepare", spy)
    return banks


def test_init_from_k_adapters_is_bit_identical(spt_export, tiny_lm_dir, synth_dir, tmp_path, bank_at_start):
    a, b = spt_export / "prompt-0", spt_export / "prompt-1"
    _train(tiny_lm_dir, synth_dir, tmp_path / "run", f"--spt.init_from_peft={a},{b}", "--train.max_steps=1")
    exported = torch.stack([load_file(p / "adapter_model.safetensors")["prompt_embeddings"] for p in (a, b)])
    assert len(bank_at_start) == 1 and torch.equal(bank_at_start[0], exported)
    # the same folders as a YAML list
    _train(tiny_lm_dir, synth_dir, tmp_path / "run2", f"--spt.init_from_peft=[{a}, {b}]", "--train.max_steps=1")
    assert torch.equal(bank_at_start[1], exported)



def test_init_from_peft_records_absolute_paths(spt_export, tiny_lm_dir, synth_dir, tmp_path, monkeypatch):
    """config.yaml names the adapters by absolute path, like the data and the model: usable from anywhere."""
    import yaml

    monkeypatch.chdir(spt_export)
    _train(tiny_lm_dir, synth_dir, tmp_path / "run", "--spt.init_from_peft=prompt-0", "--train.max_steps=1")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["spt"]["init_from_peft"] == [str((spt_export / "prompt-0").resolve())]


def test_init_from_one_adapter_fills_every_slot_then_prompts_specialise(spt_export, tiny_lm_dir, synth_dir,
                                                                        tmp_path, bank_at_start):
    adapter = spt_export / "prompt-1"
    run = tmp_path / "run"
    _train(tiny_lm_dir, synth_dir, run, f"--spt.init_from_peft={adapter}", "--spt.K=3")
    prompt = load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"]
    assert bank_at_start[0].shape == (3, 2, 32)
    assert all(torch.equal(bank_at_start[0][k], prompt) for k in range(3))
    # identical prompts, but the k-means keys route examples apart and the routed LM loss weights them apart
    trained = load_file(run / "checkpoint-last" / "model.safetensors")["prompts"]
    assert not torch.allclose(trained[0], trained[1]) and not torch.allclose(trained[1], trained[2])
    # a resumed run keeps its trained bank: the adapters are not read again
    assert main(["train", "--resume", str(run), "--no-progress", "--train.max_steps=3"]) == 0
    assert len(bank_at_start) == 1


def test_one_adapter_with_prompt_mean_keys_stays_symmetric_and_says_so(spt_export, tiny_lm_dir, synth_dir,
                                                                         tmp_path, caplog):
    """The paper recipe scores a prompt by its own mean: K identical prompts get identical scores and gradients."""
    run = tmp_path / "run"
    _train(tiny_lm_dir, synth_dir, run, f"--spt.init_from_peft={spt_export / 'prompt-0'}", "--spt.recipe=paper")
    trained = load_file(run / "checkpoint-last" / "model.safetensors")["prompts"]
    start = load_file(spt_export / "prompt-0" / "adapter_model.safetensors")["prompt_embeddings"]
    assert not torch.allclose(trained[0], start) and torch.equal(trained[0], trained[1])  # trained, yet identical
    assert any("stay identical" in r.message and "spt.keys=kmeans" in r.message for r in caplog.records)


def test_init_from_peft_errors(spt_export, tiny_lm_dir, synth_dir, tmp_path, capsys):
    from spt.export import load_peft_bank, read_peft_prompt

    adapter = spt_export / "prompt-0"
    # wrong n: one line naming the adapter's config and the field, and no run folder left behind
    args = tiny_train_args(tiny_lm_dir, synth_dir, tmp_path / "run", f"--spt.init_from_peft={adapter}",
                           "--spt.num_virtual_tokens=3")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{adapter / 'adapter_config.json'}: num_virtual_tokens is 2, but spt.num_virtual_tokens is 3" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="token_dim is 32, but the base model's hidden size is 64"):
        read_peft_prompt(adapter, 2, 64)
    with pytest.raises(ValueError, match=r"names 3 adapter folders; give 1 .* or K=2"):
        load_peft_bank([str(adapter)] * 3, 2, 2, 32)

    lora = tmp_path / "lora"
    shutil.copytree(adapter, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"lora/adapter_config.json: peft_type is 'LORA'; only prompt-tuning"):
        read_peft_prompt(lora)

    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match="a pickle, which spt never unpickles"):
        read_peft_prompt(pickled)

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    save_file({"prompt_embeddings": torch.zeros(2, 31)}, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(2, 31\), but num_virtual_tokens is 2"):
        read_peft_prompt(bad, 2, None)
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        read_peft_prompt(tmp_path / "missing")
    assert main(["config", "show", "--method=lora", f"--spt.init_from_peft={adapter}"]) == 2
    assert "spt.init_from_peft starts a prompt bank: it needs method spt or pt" in capsys.readouterr().err


def test_pt_run_exports_one_adapter_that_starts_an_spt_bank(tiny_lm_dir, synth_dir, tmp_path, bank_at_start):
    pt = tmp_path / "pt"
    _train(tiny_lm_dir, synth_dir, pt, "--method=pt")
    out = tmp_path / "pt-peft"
    assert _export(pt, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "prompt-0", "retriever.safetensors",
                                                     "spt_export.json"]
    info = json.loads((out / "spt_export.json").read_text())
    assert (info["method"], info["K"], info["n"]) == ("pt", 1, 2)
    assert "nothing to choose" in (out / "README.md").read_text()
    pt_prompt = load_file(pt / "checkpoint-best" / "model.safetensors")["prompts"][0]
    assert torch.equal(load_file(out / "prompt-0" / "adapter_model.safetensors")["prompt_embeddings"], pt_prompt)

    spt = tmp_path / "spt"
    _train(tiny_lm_dir, synth_dir, spt, f"--spt.init_from_peft={out / 'prompt-0'}", "--train.max_steps=1")
    assert len(bank_at_start) == 2  # the PT run, then the SPT run
    assert bank_at_start[1].shape == (2, 2, 32)
    assert torch.equal(bank_at_start[1][0], pt_prompt) and torch.equal(bank_at_start[1][1], pt_prompt)
