"""Specification of train.py under torchrun: two CPU processes (gloo) train one model, their
weights stay identical bit for bit, and every step's loss and gradient are one process's on the
same global batch, a distilled student's too; a NaN on one rank is skipped by both; rank 0 alone
prints and writes; a two-process run resumes exactly.

One `torchrun --nproc_per_node 2` call runs all the two-process runs (train.main once per run, in
the same two workers), and one plain process runs the single-process references, both through
WORKER below, which also saves what each rank saw: every step's loss and summed gradients, and
the final weights. The model is a tiny random BERT with the real vocab (as in test_reliability.py)
with no dropout (each rank draws its own masks), so the runs may differ only by float rounding.

Why the gradients and not the final weights are compared with the single process: the key bias
(part of qkv.bias) has a true gradient of exactly zero (softmax ignores a shift shared by all the
keys), so its gradient is rounding noise, and AdamW's m / sqrt(v) turns noise of any size into
steps of size lr. The two runs' key biases drift apart by ~lr a step without changing any output.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import make_tiny_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parent.parent
# Runs train.main once per run in sys.argv[1] (a JSON list of {"argv": [...], "poison": bool}), in
# this process, which may be one rank of several. For each run it saves <out_dir>-<rank>.pt: the
# loss and the summed gradients of every step, and the weights at the end of training.
WORKER = """
import faulthandler, json, os, sys
faulthandler.dump_traceback_later(240, exit=True)  # a hung collective: print where, and end this rank
import torch
import train

rank = os.environ.get("RANK", "single")
real_training_step, real_train, real_task_loss = train.training_step, train.train, train.task_loss
steps = []

def recording_training_step(args, model, *rest):
    loss = real_training_step(args, model, *rest)
    steps.append({"loss": loss, "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}})
    return loss

def saving_train(args, model, *rest):
    steps.clear()
    real_train(args, model, *rest)
    torch.save({"steps": steps, "model": model.state_dict()}, f"{args.out_dir}-{rank}.pt")

def poisoned_task_loss(task, outputs, labels, *teaching, calls=iter(range(10**6))):
    loss, k = real_task_loss(task, outputs, labels, *teaching), next(calls)
    if k == 2:
        return loss * float("nan")          # step 1: a NaN loss
    if k == 7:
        return loss + torch.sqrt(loss - loss)  # step 3: a finite loss with a NaN gradient
    return loss

train.training_step, train.train = recording_training_step, saving_train
for run in json.loads(sys.argv[1]):
    train.task_loss = poisoned_task_loss if run["poison"] and rank == "1" else real_task_loss
    train.main(run["argv"])
"""

# sst and sts, 41 examples each in batches of 5: every step splits 3 + 2 over two ranks, and the
# one batch of a single example leaves rank 1 with nothing (it runs with share 0).
COMMON = ["--tasks", "sst,sts", "--sampler", "roundrobin", "--limit", "41", "--batch_size", "5", "--max_length", "32",
          "--eval_limit", "16", "--eval_batch_size", "4", "--lr", "1e-3", "--seed", "3", "--device", "cpu",
          "--lr_schedule", "constant",  # constant: the "resumed" run continues a 1-epoch run for a second epoch
          "--precision", "fp32"]  # the gradients are compared at float32's rounding
RUNS = {  # name: (flags, NaN on rank 1, also run in one process)
    "sum": (["--loss", "sum", "--epochs", "1", "--hidden_dropout_prob", "0"], False, True),
    "gls-smart-clip": (["--loss", "gls", "--smart", "--smart_sigma", "0", "--clip_grad", "0.5", "--epochs", "1",
                        "--hidden_dropout_prob", "0"], False, True),
    "nan-on-rank-1": (["--loss", "sum", "--epochs", "1", "--hidden_dropout_prob", "0"], True, False),
    "two-epochs": (["--loss", "sum", "--epochs", "2", "--hidden_dropout_prob", "0.1"], False, False),
    "resumed": (["--loss", "sum", "--epochs", "1", "--hidden_dropout_prob", "0.1"], False, False),
    # a student of an SST teacher (TEACHER: a one-process run of the fixture's), λ rising over its steps
    "distilled": (["--loss", "gls", "--teachers", "TEACHER", "--epochs", "1", "--hidden_dropout_prob", "0"], False, True),
}


def worker_runs(data_dir, bert, teacher, folder, names, resume=False):
    runs = []
    for name in names:
        flags, poison, _ = RUNS[name]
        flags = [str(teacher) if flag == "TEACHER" else flag for flag in flags]
        argv = ["--data_dir", str(data_dir), "--bert", str(bert), "--out_dir", str(folder / name), *COMMON, *flags]
        runs.append({"argv": argv, "poison": poison})
    if resume:  # the "resumed" run again, now for two epochs
        runs.append({"argv": runs[list(names).index("resumed")]["argv"] + ["--resume", "--epochs", "2"], "poison": False})
    return runs


def run_worker(tmp, launcher, runs):
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([*launcher, str(worker), json.dumps(runs)], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun passes SIGTERM on to the workers (each in a session of its own)
        stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, checkpoint_dir):
    """(folder of the two-process runs, folder of the one-process runs, the two-process stdout)."""
    tmp = tmp_path_factory.mktemp("distributed")
    bert = make_tiny_checkpoint(tmp / "tiny", checkpoint_dir / "vocab.txt", attention_probs_dropout_prob=0.0)
    two, one, teacher = tmp / "two", tmp / "one", tmp / "teacher"
    two.mkdir(), one.mkdir()
    train.main(["--data_dir", str(data_dir), "--bert", str(bert), "--out_dir", str(teacher), *COMMON, "--tasks", "sst",
                "--epochs", "1"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    stdout = run_worker(tmp, torchrun, worker_runs(data_dir, bert, teacher, two, RUNS, resume=True))
    run_worker(tmp, [sys.executable], worker_runs(data_dir, bert, teacher, one, [n for n in RUNS if RUNS[n][2]]))
    return two, one, stdout, bert


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", RUNS)
def test_both_ranks_end_with_the_same_weights_bit_for_bit(runs, name):
    two, *_ = runs
    rank0, rank1 = load(f"{two / name}-0.pt"), load(f"{two / name}-1.pt")
    assert rank0["model"].keys() == rank1["model"].keys()
    for key, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][key]), key
        assert torch.isfinite(tensor).all(), key
    if name != "resumed":  # last.pt (rank 0's, written at the end) holds them too
        last = load(two / name / "last.pt")
        assert all(torch.equal(last["model"][k], t) for k, t in rank0["model"].items())


@pytest.mark.parametrize("name", [n for n in RUNS if RUNS[n][2]])
def test_every_step_has_one_process_loss_and_gradient_on_the_same_global_batch(runs, name):
    two, one, *_ = runs
    single, rank0, rank1 = load(f"{one / name}-single.pt"), load(f"{two / name}-0.pt"), load(f"{two / name}-1.pt")
    assert len(single["steps"]) == len(rank0["steps"]) == 9
    for step, (expected, got, got1) in enumerate(zip(single["steps"], rank0["steps"], rank1["steps"])):
        assert got["loss"] == got1["loss"], step  # the loss is the global batch's, the same on both ranks
        # float32 sums over the two halves in another order: up to 1.1e-6 apart (measured, one VM)
        assert got["loss"] == pytest.approx(expected["loss"], rel=5e-6), step
        assert got["grads"].keys() == expected["grads"].keys(), step
        for key, grad in got["grads"].items():
            assert torch.equal(grad, got1["grads"][key]), (step, key)
            error = (grad - expected["grads"][key]).norm() / expected["grads"][key].norm()
            assert error < 1e-5, (step, key, error.item())
    for got, expected in zip(read_metrics(two / name), read_metrics(one / name)):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=5e-6)
        assert got["skipped_steps"] == expected["skipped_steps"] == 0


def test_a_nan_on_one_rank_skips_the_step_on_both(runs):
    two, _, stdout, _ = runs
    (record,) = read_metrics(two / "nan-on-rank-1")
    assert record["skipped_steps"] == 2
    assert len(load(f"{two / 'nan-on-rank-1'}-0.pt")["steps"]) == 9
    assert "step 1: non-finite loss or gradient, step skipped (1 so far)" in stdout
    assert "step 3: non-finite loss or gradient, step skipped (2 so far)" in stdout


def test_rank_0_alone_prints_and_writes_the_files_one_process_writes(runs):
    two, one, stdout, _ = runs
    assert stdout.count("best model, dev:") == len(RUNS) + 1  # one table per train.main call
    assert stdout.count("epoch 1: train loss") == len(RUNS)
    for name in ("sum", "gls-smart-clip"):
        assert sorted(os.listdir(two / name)) == sorted(os.listdir(one / name))
        assert sorted(os.listdir(two / name / "predictions")) == sorted(os.listdir(one / name / "predictions"))


def test_sharded_evaluation_predicts_what_one_process_predicts(runs, data_dir, tmp_path):
    two, _, _, bert = runs
    out_dir = tmp_path / "eval"
    train.main(["--data_dir", str(data_dir), "--bert", str(bert), "--out_dir", str(out_dir), *COMMON,
                "--eval_only", "--checkpoint", str(two / "sum" / "best.pt")])
    for path in (two / "sum" / "predictions").iterdir():
        assert (out_dir / "predictions" / path.name).read_text() == path.read_text(), path.name


def test_a_two_process_run_resumed_at_an_epoch_end_ends_bit_for_bit_like_one_left_alone(runs):
    """With dropout on: each rank's own RNG state is saved in last.pt and given back to that rank."""
    two, *_ = runs
    resumed, alone = load(two / "resumed" / "last.pt"), load(two / "two-epochs" / "last.pt")
    assert len(resumed["ranks_rng"]) == 2
    assert not torch.equal(resumed["ranks_rng"][0]["torch_rng"], resumed["ranks_rng"][1]["torch_rng"])
    for rank in (0, 1):
        assert torch.equal(resumed["ranks_rng"][rank]["torch_rng"], alone["ranks_rng"][rank]["torch_rng"])
    for key, tensor in alone["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    for index, state in alone["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"]["state"][index][name]), torch.as_tensor(value))
    assert read_metrics(two / "resumed") == read_metrics(two / "two-epochs")
