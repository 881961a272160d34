"""Nothing lost, nothing silently wrong, nothing executed: training runs under crashes, interrupts, reused
folders, changed resumes, full disks and crafted checkpoints (issue: hostile-input and crash sweep)."""

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_args
from spt.checkpoint import _decode, _encode, read_trainer_state, write_trainer_state
from spt.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")


def _args(tiny_lm_dir, synth_dir, out, *extra):
    return tiny_train_args(tiny_lm_dir, synth_dir, out, *extra)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint-last" / "model.safetensors")


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max abs difference {diff}"
    return diff


def _one_error(err: str) -> str:
    """The CLI's error: exactly one line, no traceback (progress bars from loading may precede it)."""
    errors = [line for line in err.splitlines() if line.startswith("spt: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _no_temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


# --- trainer state: plain data only ---------------------------------------------------------------

def test_trainer_state_round_trip_keeps_every_value(tmp_path):
    rng = np.random.RandomState(3)
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0], "foreach": None}]},
             "scheduler": {"base_lrs": [0.01], "last_epoch": 3, "lr_lambdas": [None]},
             "step": 3, "epoch": 0, "batch_in_epoch": 3, "best": float("inf"),
             "rng": {"python": random.Random(1).getstate(), "numpy": rng.get_state(), "torch": torch.get_rng_state()},
             "method": {"routing": {"route_avg": torch.rand(4).bfloat16(),
                                    "replay": [(torch.ones(2, 2), torch.zeros(2))]}}}
    write_trainer_state(tmp_path, state)
    back = read_trainer_state(tmp_path)
    assert back["optimizer"]["state"][0]["step"].item() == 3.0 and 0 in back["optimizer"]["state"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["best"] == float("inf") and back["scheduler"]["lr_lambdas"] == [None]
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    assert np.random.rand() == rng.rand()  # the numpy generator continues exactly where it was
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["method"]["routing"]["route_avg"].dtype == torch.bfloat16
    f, q = back["method"]["routing"]["replay"][0]
    assert torch.equal(f, torch.ones(2, 2)) and torch.equal(q, torch.zeros(2))
    assert "Infinity" not in (tmp_path / "trainer_state.json").read_text()  # strict JSON


def test_trainer_state_rejects_what_it_cannot_store_and_bad_references(tmp_path):
    with pytest.raises(TypeError, match=r"trainer state\.x: cannot store a set"):
        _encode({"x": {1, 2}}, {}, "")
    with pytest.raises(ValueError, match="refers to tensor 't9'"):
        _decode({"__tensor__": "t9"}, {}, tmp_path / "trainer_state.json")


class _Payload:
    """Unpickling this would create a marker file: what a crafted checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_runs_no_code(tiny_lm_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=2")) == 0
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoint-last"
    capsys.readouterr()
    # an old-format checkpoint whose trainer_state.pt is a pickle with a payload
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (ckpt / name).unlink()
    (ckpt / "trainer_state.pt").write_bytes(pickle.dumps({"step": 1, "x": _Payload(str(marker))}))
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=4"]) == 2
    err = _one_error(capsys.readouterr().err)
    assert "trainer_state.pt" in err and "cannot be read safely" in err
    assert not marker.exists()
    # the same payload through torch.save (its zip format) is refused too
    (ckpt / "trainer_state.pt").unlink()
    torch.save({"step": 1, "x": _Payload(str(marker))}, ckpt / "trainer_state.pt")
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=4"]) == 2
    assert not marker.exists()
    # a JSON state that is not what we wrote: a clear error, nothing else
    (ckpt / "trainer_state.json").write_text('{"step": {"__tensor__": "../../etc/passwd"}}')
    (ckpt / "trainer_state.pt").unlink()
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=4"]) == 2
    assert "refers to tensor" in capsys.readouterr().err


# --- run folders: never overwritten or mixed without being asked -----------------------------------

def test_existing_run_is_refused_then_overwritten_on_request(tiny_lm_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=2")) == 0
    before = _weights(out)
    capsys.readouterr()
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=2", "--train.lr=0.5")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    _assert_bitwise_equal(before, _weights(out))  # untouched
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=2", "--train.lr=0.5", "--overwrite")) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert sum(r.startswith("0,valid,loss,") for r in rows) == 1  # one run's metrics, not two mixed
    assert not torch.equal(before["prompts"], _weights(out)["prompts"])


def test_resume_applies_changed_lr_and_refuses_structural_changes(tiny_lm_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=2", "--train.scheduler=constant")) == 0
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=4", "--train.lr=0.5"]) == 0
    lrs = [float(r.split(",")[3]) for r in (out / "metrics.csv").read_text().splitlines()
           if ",train,lr," in r]
    assert lrs[:2] == [0.01, 0.01] and lrs[2:] == [0.5, 0.5]  # the new lr is what ran after the resume
    assert "lr: 0.5" in (out / "config.yaml").read_text() and "max_steps: 4" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=6",
                 "--train.batch_size=3", "--spt.K=3"]) == 2
    err = capsys.readouterr().err
    assert "cannot change on resume" in err and "train.batch_size (4 -> 3)" in err and "spt.K (2 -> 3)" in err


def test_resume_without_changes_drops_metrics_logged_after_the_checkpoint(tiny_lm_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=4")) == 0
    with (out / "metrics.csv").open("a") as f:  # as if the run had logged step 5 and then died
        f.write("5,train,llm,9.9\n")
    # checkpoint-last is at step 4: rows after it are logged again by the resumed run, not kept twice
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=6"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert "5,train,llm,9.9" not in rows and sum(r.startswith("5,train,llm,") for r in rows) == 1


# --- clear errors before anything is loaded ---------------------------------------------------------

def test_bad_output_folders_and_values_are_one_line_errors(tiny_lm_dir, synth_dir, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_args(tiny_lm_dir, synth_dir, afile)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "x"

    assert main(_args(tiny_lm_dir, synth_dir, tmp_path / "inf", "--train.lr=inf")) == 2
    assert "train.lr must be a finite number" in capsys.readouterr().err

    out = tmp_path / "long"
    assert main(_args(tiny_lm_dir, synth_dir, out, "--data.max_length=600")) == 2
    err = capsys.readouterr().err
    assert "data.max_length=600 plus the 2 virtual tokens" in err and "set --data.max_length=510" in err
    assert not out.exists()  # no half-made run folder

    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".spt-write-test"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert main(_args(tiny_lm_dir, synth_dir, tmp_path / "ro")) == 2
    err = capsys.readouterr().err
    assert "is not writable: Permission denied" in err and "Traceback" not in err


def test_full_disk_leaves_no_temps_and_resume_continues_exactly(tiny_lm_dir, synth_dir, tmp_path, monkeypatch,
                                                                capsys):
    import spt.checkpoint as ck

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(_args(tiny_lm_dir, synth_dir, straight, "--train.max_steps=6")) == 0
    real = ck.write_trainer_state
    calls = {"n": 0}

    def full_disk(folder, state):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint-last (step 4) hits a full disk
            (folder / "partial.bin").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "trainer_state.safetensors"))
        return real(folder, state)

    monkeypatch.setattr(ck, "write_trainer_state", full_disk)
    assert main(_args(tiny_lm_dir, synth_dir, broken, "--train.max_steps=6")) == 2
    err = _one_error(capsys.readouterr().err)
    assert "No space left on device" in err
    assert _no_temps(broken) == []
    assert read_trainer_state(broken / "checkpoint-last")["step"] == 2  # the last good one survived
    monkeypatch.setattr(ck, "write_trainer_state", real)
    assert main(["train", "--resume", str(broken), "--no-progress"]) == 0
    _assert_bitwise_equal(_weights(straight), _weights(broken))


def test_leftovers_of_a_crashed_write_are_recovered(tiny_lm_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_lm_dir, synth_dir, out, "--train.max_steps=2")) == 0
    dead = 2**22 + 12345  # above the default pid_max: no live process has it
    (out / f".checkpoint-last.tmp-{dead}").mkdir()
    (out / f".checkpoint-last.tmp-{dead}" / "junk").write_bytes(b"\0" * 100)
    (out / "checkpoint-best").rename(out / f".checkpoint-best.old-{dead}")  # died between the two renames
    assert main(["train", "--resume", str(out), "--no-progress", "--train.max_steps=4"]) == 0
    assert _no_temps(out) == [] and (out / "checkpoint-best" / "model.safetensors").is_file()


# --- kills: SIGINT and SIGKILL at random moments, resumed runs equal the uninterrupted one --------------

def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "spt.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env)


KILL_STEPS = ["--train.max_steps=60", "--train.eval_every=5", "--train.log_every=1"]


def _last_step(run: Path) -> int:
    """The newest training step in the run's metrics.csv (flushed every row), -1 before any."""
    try:
        rows = (run / "metrics.csv").read_text().splitlines()[1:]
    except FileNotFoundError:
        return -1
    steps = [int(r.split(",")[0]) for r in rows if ",train," in r and r.split(",")[0].isdigit()]
    return max(steps, default=-1)


@pytest.fixture(scope="module")
def straight_run(tiny_lm_dir, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kills") / "straight"
    assert main(_args(tiny_lm_dir, synth_dir, out, *KILL_STEPS)) == 0
    return _weights(out)


@pytest.mark.parametrize("sig,trial", [(signal.SIGINT, 0), (signal.SIGKILL, 0), (signal.SIGINT, 1),
                                       (signal.SIGKILL, 1)], ids=["sigint-0", "sigkill-0", "sigint-1", "sigkill-1"])
def test_killed_training_resumes_to_the_uninterrupted_result(tiny_lm_dir, synth_dir, tmp_path, straight_run, sig,
                                                             trial):
    rng = random.Random(f"{sig}-{trial}")
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _spawn(_args(tiny_lm_dir, synth_dir, out, *KILL_STEPS), log)
    target = rng.randint(2, 40)  # of 60 steps: the signal lands mid-run however fast this machine is
    deadline = time.time() + 120
    while _last_step(out) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))  # anywhere inside a step
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    assert not (out / "train_summary.json").is_file(), "the signal came after the run had finished"
    if sig == signal.SIGINT:
        assert rc == 130 and "stopped at step" in log.read_text(), log.read_text()[-2000:]
        assert _no_temps(out) == []
    resume = (["train", "--resume", str(out), "--no-progress"] if (out / "checkpoint-last").is_dir()
              else [*_args(tiny_lm_dir, synth_dir, out, *KILL_STEPS), "--overwrite"])
    assert main(resume) == 0
    assert _no_temps(out) == []
    assert _assert_bitwise_equal(straight_run, _weights(out)) == 0.0


# --- hostile configs and training data: one line, nothing executed, nothing left ------------------------

HOSTILE_CONFIGS = {
    "binary": b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 20,
    "python-tag": b'train: !!python/object/apply:os.system ["touch MARKER"]\n',
    "top-level-list": b"- method\n- spt\n",
    "unknown-key": b"train:\n  learning_rate: 0.1\n",
    "wrong-type": b"train:\n  lr: fast\n",
    "nan-lr": b"train:\n  lr: .nan\n",
    "bad-choice": b"method: magic\n",
    "unclosed": b"train: {lr: 0.1\n",
    "huge-number": b"train:\n  max_steps: " + b"9" * 5000 + b"\n",
}
HOSTILE_TRAIN_DATA = {
    "empty": b"",
    "binary": bytes(range(256)) * 8,
    "utf16": '{"persona": ["a."], "context": [], "response": "b"}\n'.encode("utf-16"),
    "all-wrong-shapes": b'42\n[1, 2]\n"text"\nnull\n',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_hostile_config_files(name, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    path = tmp_path / "c.yaml"
    path.write_bytes(HOSTILE_CONFIGS[name].replace(b"MARKER", str(marker).encode()))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output-dir", str(out), "--no-progress"]) == 2
    err = _one_error(capsys.readouterr().err)
    assert "c.yaml" in err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("name", sorted(HOSTILE_TRAIN_DATA))
def test_hostile_training_data(name, tiny_lm_dir, synth_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(HOSTILE_TRAIN_DATA[name])
    out = tmp_path / "run"
    args = _args(tiny_lm_dir, synth_dir, out)
    args[args.index(f"--data.train={synth_dir / 'train.jsonl'}")] = f"--data.train={data}"
    assert main(args) == 2
    err = _one_error(capsys.readouterr().err)
    assert "train.jsonl" in err
    assert not out.exists()  # nothing half-made
