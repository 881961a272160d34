from pathlib import Path

import pytest

from spt.config import Config, ConfigError, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_load_and_take_overrides():
    assert len(CONFIGS) >= 5
    for path in CONFIGS:
        cfg = load_config(path, parse_overrides(["--model.name_or_path=/m", "--data.train=t.jsonl", "--spt.K=4",
                                                 "--train.max_steps=20"]))
        assert (cfg.model.name_or_path, cfg.data.train, cfg.spt.K, cfg.train.max_steps) == ("/m", "t.jsonl", 4, 20)


def test_paper_settings():
    opt_path = next(p for p in CONFIGS if "opt125m" in p.name)
    opt = load_config(opt_path)
    assert (opt.spt.K, opt.spt.num_virtual_tokens, opt.spt.lambda_sel, opt.spt.recipe) == (4, 8, 0.4, "routed")
    paper = load_config(opt_path, {"spt.recipe": "paper"})  # the paper's exact recipe, one switch away
    spt = paper.spt
    assert (spt.lambda_ctr, spt.lambda_fus, spt.keys, spt.tau_sim) == (0.4, 1.0, "prompt_mean", 1.0)
    llama_path = next(p for p in CONFIGS if "llama2-7b" in p.name)
    llama = load_config(llama_path, {"spt.recipe": "paper", "spt.lambda_ctr": 1.0})  # as the config's comment says
    assert (llama.spt.K, llama.spt.num_virtual_tokens, llama.spt.lambda_sel, llama.spt.lambda_ctr) == (4, 1, 1.0, 1.0)
    assert "--spt.recipe=paper --spt.lambda_ctr=1.0" in llama_path.read_text()


@pytest.mark.parametrize("override, message", [
    ("--spt.K=0", "spt.K must be > 0"),
    ("--spt.retriever=lstm", "spt.retriever must be one of"),
    ("--train.batch_size=big", "train.batch_size must be an integer"),
    ("--train.mixed_precision=fp8", "train.mixed_precision must be one of"),
    ("--spt.nope=1", "--spt.nope: no such setting"),
    ("--data.max_context_turns=-2", "data.max_context_turns must be >= 0"),
    ("--spt.prompt_init=text", "spt.prompt_init_text must be set"),
])
def test_invalid_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, parse_overrides([override]))


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spt:\n  K: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: spt\.K must be an integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_parse_yaml_types_and_round_trip(tmp_path):
    o = parse_overrides(["--train.lr=3e-4", "--data.max_context_turns", "null", "--spt.fusion_weights=softmax"])
    cfg = load_config(None, o)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.max_context_turns is None
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match=r"look like --section\.field=value"):
        parse_overrides(["max_steps=3"])
    assert Config().spt.K == 4


def test_yaml_boolean_words_reach_string_choices():
    from spt.config import load_config, parse_overrides

    cfg = load_config(None, parse_overrides(["--train.mixed_precision=no"]))  # YAML 1.1 reads "no" as False
    assert cfg.train.mixed_precision == "no"


def test_every_setting_is_documented_and_config_show_round_trips(tmp_path, capsys):
    from spt.cli import main
    from spt.config import field_docs

    docs = field_docs()
    assert len(docs) > 80 and [k for k, (_, doc) in docs.items() if not doc] == []
    assert docs["spt.tau_sim"][0] is None and "recipe" in docs["spt.tau_sim"][1]  # None = the recipe decides
    assert main(["config", "show", "--train.lr=0.05", "--spt.K=3"]) == 0
    shown = capsys.readouterr().out
    assert "  lr: 0.05  # AdamW learning rate (peak, after warmup) [default: 0.0001]" in shown
    assert "  K: 3  # number of soft prompts in the bank [default: 4]" in shown
    saved = tmp_path / "c.yaml"
    saved.write_text(shown)
    assert load_config(saved).train.lr == 0.05 and load_config(saved).spt.K == 3  # valid YAML, loads back


@pytest.mark.parametrize("flag,suggestion", [("--train.learning_rate=1", "did you mean train.lr?"),
                                             ("--spt.KK=2", "did you mean spt.K?"),
                                             ("--trian.lr=1", "did you mean train.lr?"),
                                             ("--train.gradient_accumulation_steps=2",
                                              "did you mean train.grad_accum?")])
def test_unknown_override_names_the_flag_and_the_nearest_setting(flag, suggestion, tmp_path, capsys):
    from spt.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.1\n")
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r"), flag]) == 2
    err = capsys.readouterr().err
    assert f"--{flag[2:].split('=')[0]}: no such setting ({suggestion})" in err
    assert str(cfg) not in err  # the flag is to blame, not the file


def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny-cpu").spt.K == 2 and load_config("spt-opt125m-convai2.yaml").method == "spt"
    with pytest.raises(ConfigError, match=r"shipped configs, usable by name: .*tiny-cpu"):
        load_config("no-such-config")
