"""Specification of checkpoints.py: a run's files are written whole or not at all, a checkpoint
that does not fit is refused with one line that names the file, last.pt restores everything a
step depends on, and a run stopped at any moment (killed while saving, interrupted between
best.pt, last.pt and metrics.jsonl, or before its first save) and resumed ends bit for bit where
a run left alone ends.

The whole runs use a tiny random BERT (conftest.TINY_BERT) and train.py as a user runs it.
"""
import argparse
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import optim
import train
from bert import CheckpointError
from conftest import assert_identical, assert_same_run, snapshot

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- files and checkpoints

def test_a_save_that_fails_halfway_leaves_the_file_it_was_replacing_whole(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save_atomically({"step": torch.tensor(1)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # a lambda cannot be pickled: torch.save fails after it began writing
        checkpoints.save_atomically({"step": torch.tensor(2), "broken": lambda: None}, path)
    assert path.read_bytes() == before and checkpoints.load_checkpoint(path)["step"] == 1
    checkpoints.write_atomically(tmp_path / "scores.json", "{}\n")
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate has no UTF-8: the write fails halfway
        checkpoints.write_atomically(tmp_path / "scores.json", '{"sst": "\ud800"}\n')
    assert (tmp_path / "scores.json").read_text() == "{}\n"


def test_metrics_are_rewritten_whole_from_the_history_and_read_back(tmp_path):
    """metrics.jsonl is rewritten whole, one line per epoch of the history given: what a resumed run
    writes from last.pt's history, whatever the file held before."""
    assert checkpoints.read_metrics(tmp_path) == []  # before the first epoch: no file
    history = [{"epoch": 1, "dev": {"sst": 0.25}}, {"epoch": 2, "dev": {"sst": 0.5}}]
    checkpoints.write_metrics(tmp_path, history)
    assert checkpoints.read_metrics(tmp_path) == history
    checkpoints.write_metrics(tmp_path, history[:1])
    assert checkpoints.read_metrics(tmp_path) == history[:1]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("edit, complaint", [
    (lambda s: s.pop("1.bias"), r"does not fit this model \(missing '1\.bias'; check --tasks\)"),
    (lambda s: s.update(extra=torch.zeros(1)), r"does not fit this model \(unexpected 'extra'"),
    (lambda s: s.update({"0.weight": torch.zeros(3, 5)}), r"'0\.weight' has shape \(3, 5\), this model's \(3, 4\)"),
    (lambda s: s.update({"0.weight": "text"}), r"not a model checkpoint \(best\.pt or last\.pt from train\.py\)"),
], ids=["missing", "unexpected", "shape", "not tensors"])
def test_weights_that_do_not_fit_the_model_are_refused_naming_the_file(tmp_path, edit, complaint):
    state = small_model().state_dict()
    edit(state)
    checkpoints.save_atomically({"model": state}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: " + complaint):
        checkpoints.load_model_state(tmp_path / "best.pt", small_model())


def test_a_file_that_is_no_checkpoint_or_holds_code_is_refused(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=r"best\.pt: not a readable checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "best.pt")
    torch.save({"model": argparse.Namespace(x=1)}, tmp_path / "pickled.pt")  # an object, not data
    with pytest.raises(CheckpointError, match=r"pickled\.pt: not a readable checkpoint \(UnpicklingError\)"):
        checkpoints.load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"gone\.pt: checkpoint not found"):
        checkpoints.load_checkpoint(tmp_path / "gone.pt")


def trained(model):
    """An AdamW with two steps behind it, so that its moments and step counts are not zeros."""
    optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return optimizer


def test_last_pt_restores_weights_optimizer_random_numbers_and_progress(tmp_path):
    model, args = small_model(), argparse.Namespace(seed=1)
    optimizer = trained(model)
    progress = {"epoch": 1, "step": 3, "history": [{"epoch": 1}]}
    checkpoints.save_resumable(tmp_path / "last.pt", args, model, optimizer, None, progress, torch.device("cpu"))
    expected_draw = torch.rand(3)  # what the run would draw next, had it gone on

    fresh = small_model()
    fresh_optimizer = optim.AdamW(fresh.parameters(), lr=1e-2)
    torch.manual_seed(123)  # another state, which resume must replace
    assert checkpoints.resume(tmp_path / "last.pt", fresh, fresh_optimizer, None, torch.device("cpu")) == progress
    assert torch.equal(torch.rand(3), expected_draw)
    assert_identical(fresh.state_dict(), model.state_dict(), "model")
    assert_identical(fresh_optimizer.state_dict(), optimizer.state_dict(), "optimizer")


def test_an_optimizer_state_of_another_model_is_refused(tmp_path):
    model = small_model()
    checkpoints.save_resumable(tmp_path / "last.pt", argparse.Namespace(), model, trained(model), None, {},
                               torch.device("cpu"))
    fresh = small_model()
    fewer = optim.AdamW(list(fresh.parameters())[:2], lr=1e-2)  # e.g. a frozen layer: fewer parameters
    with pytest.raises(CheckpointError, match=r"last\.pt: its optimizer or SMART state does not fit this run"):
        checkpoints.resume(tmp_path / "last.pt", fresh, fewer, None, torch.device("cpu"))


# ----------------------------------------------------------------------------- whole runs, stopped and resumed

RUN = ["--tasks", "sst,sts", "--sampler", "roundrobin", "--smart", "--limit", "48", "--batch_size", "8",
       "--epochs", "2", "--save_every", "2", "--max_length", "32", "--eval_limit", "16", "--lr", "1e-3",
       "--seed", "2", "--hidden_dropout_prob", "0.3", "--lr_schedule", "constant", "--device", "cpu"]
# 6 steps an epoch: mid-epoch checkpoints after steps 2 and 4. Every flag is pinned, so that a
# change of default does not change what these tests run.


def run_flags(data_dir, tiny, out_dir, *more):
    return ["--data_dir", str(data_dir), "--bert", str(tiny), "--out_dir", str(out_dir), *RUN, *more]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, tiny):
    """The run the interrupted ones must reproduce."""
    out_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train.main(run_flags(data_dir, tiny, out_dir))
    return out_dir


def test_same_seed_on_the_same_cpu_gives_the_same_run_bit_for_bit(tmp_path, data_dir, tiny, uninterrupted):
    train.main(run_flags(data_dir, tiny, tmp_path / "again"))
    assert_same_run(uninterrupted, tmp_path / "again")


# Runs train.py in a process that SIGKILLs itself while writing its second mid-epoch checkpoint
# (after step 4 of epoch 1; the first last.pt is saved before step 1): the temporary file is half
# written and last.pt holds step 2.
KILLED_WHILE_SAVING = """
import os, signal, sys
import checkpoints, train
saves = 0
def save_atomically(obj, path, save=checkpoints.save_atomically):
    global saves
    saves += path.name == "last.pt"
    if saves == 3:
        with open(str(path) + ".tmp", "wb") as f:
            f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path)
checkpoints.save_atomically = save_atomically
sys.argv[0] = "train.py"
train.cli()
"""


def test_a_run_killed_mid_epoch_and_resumed_ends_bit_for_bit_like_one_left_alone(
        tmp_path, data_dir, tiny, uninterrupted):
    out_dir = tmp_path / "run"
    flags = run_flags(data_dir, tiny, out_dir)
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    progress = torch.load(out_dir / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["step"]) == (0, 2)
    assert (out_dir / "last.pt.tmp").exists() and not (out_dir / "metrics.jsonl").exists()

    before = snapshot(out_dir)
    with pytest.raises(train.RunError, match=r"last\.pt was saved with --lr 0\.001, not 0\.01; resume with the"):
        train.main(flags + ["--resume", "--lr", "0.01"])
    assert snapshot(out_dir) == before

    train.main(flags + ["--resume", "--save_every", "3"])  # --save_every may change
    assert_same_run(uninterrupted, out_dir)


@pytest.mark.parametrize("when", ["best.pt saved, last.pt not", "last.pt saved, metrics.jsonl not"])
def test_an_interrupt_at_the_end_of_an_epoch_leaves_a_run_that_resumes_exactly(
        tmp_path, data_dir, tiny, uninterrupted, monkeypatch, capsys, when):
    """The end of an epoch saves best.pt (epoch 1 always does: nothing is better yet), then last.pt,
    then rewrites metrics.jsonl: Ctrl-C between any two must leave a run that resumes exactly."""
    out_dir = tmp_path / "run"
    save, write_metrics = checkpoints.save_atomically, checkpoints.write_metrics

    def save_atomically(obj, path):
        if when.startswith("best") and path.name == "last.pt" and obj["progress"]["epoch"] == 1:
            raise KeyboardInterrupt
        save(obj, path)

    def interrupted_write_metrics(out_dir, history):
        if when.startswith("last"):
            raise KeyboardInterrupt
        write_metrics(out_dir, history)

    monkeypatch.setattr(checkpoints, "save_atomically", save_atomically)
    monkeypatch.setattr(checkpoints, "write_metrics", interrupted_write_metrics)
    monkeypatch.setattr(sys, "argv", ["train.py", *run_flags(data_dir, tiny, out_dir)])
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    assert stopped.value.code == 130 and "--resume" in capsys.readouterr().err
    last = torch.load(out_dir / "last.pt", weights_only=True)["progress"]
    assert (out_dir / "best.pt").exists() and not (out_dir / "metrics.jsonl").exists()
    assert (last["epoch"], last["step"]) == ((0, 4) if when.startswith("best") else (1, 0))
    monkeypatch.undo()

    train.main(run_flags(data_dir, tiny, out_dir, "--resume"))
    assert_same_run(uninterrupted, out_dir)


def test_a_run_stopped_before_its_first_checkpoint_would_have_been_saved_resumes(tmp_path, data_dir, tiny, monkeypatch,
                                                                                capsys, uninterrupted):
    """Without --save_every the first epoch's end is the first regular save; a Ctrl-C before it
    (here: as best.pt is written) must still leave a run that --resume continues exactly."""
    out_dir = tmp_path / "run"
    flags = run_flags(data_dir, tiny, out_dir)
    save = checkpoints.save_atomically

    def save_atomically(obj, path):
        if path.name == "best.pt":
            raise KeyboardInterrupt
        save(obj, path)

    monkeypatch.setattr(checkpoints, "save_atomically", save_atomically)
    monkeypatch.setattr(sys, "argv", ["train.py", *flags, "--save_every", "0"])
    with pytest.raises(SystemExit):
        train.cli()
    monkeypatch.undo()
    assert torch.load(out_dir / "last.pt", weights_only=True)["progress"]["step"] == 0
    train.main(run_flags(data_dir, tiny, out_dir, "--resume"))
    assert_same_run(uninterrupted, out_dir)
