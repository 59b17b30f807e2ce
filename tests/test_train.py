"""Specification of train.py, end to end on a slice of the real data with the real checkpoint:
the loss falls, every sampler and loss strategy runs, and the leaderboard files are complete."""
import json
import math

import pytest
import torch

import checkpoints
import tasks
import train
from conftest import make_tiny_checkpoint, snapshot


def run(tmp_path, data_dir, *flags, name="run"):
    out_dir = tmp_path / name
    argv = ["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--device", "cpu", *flags]
    scores = train.main(argv)
    return out_dir, scores


def check_prediction_file(path, task, expected_ids):
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == f"id \t {tasks.PREDICTION_COLUMNS[task]} "
    assert lines[-1] == ""
    rows = [line.split(" , ") for line in lines[1:-1]]
    assert [r[0] for r in rows] == expected_ids
    for _, value in rows:
        assert value.endswith(" ")
        if task == "sts":
            assert 0.0 <= float(value) <= 5.0
        else:
            assert int(value) in range(5 if task == "sst" else 2)


def test_multitask_run_lowers_the_loss_and_writes_complete_predictions(tmp_path, data_dir):
    out_dir, scores = run(tmp_path, data_dir, "--limit", "48", "--eval_limit", "40", "--epochs", "3",
                          "--batch_size", "8", "--lr", "1e-4", "--lr_schedule", "constant", "--loss", "gls",
                          "--sampler", "roundrobin", "--hidden_dropout_prob", "0.1")
    metrics = checkpoints.read_metrics(out_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert set(scores) == {"sst", "para", "sts"}
    assert (out_dir / "best.pt").is_file() and (out_dir / "last.pt").is_file()
    for task in ("sst", "para", "sts"):
        for split in ("dev", "test-student"):
            ids = [e.id for e in tasks.read_examples(data_dir, task, split)[:40]]
            name = "test" if split == "test-student" else "dev"
            check_prediction_file(out_dir / "predictions" / f"{task}-{name}-output.csv", task, ids)


# --limit 16 at batch 8: two batches per task, so an epoch is 2 steps with break and round-robin
# (every task in every step) and 6 with sequential and proportional (one task a step).
STEPS = {"sequential": 6, "break": 2, "roundrobin": 2, "proportional": 6}


@pytest.fixture(scope="module")
def initial_state():
    """The multi-task model's weights before training, as main() builds it (seeded first)."""
    torch.manual_seed(11711)
    return train.build_model(train.parse_args([]), train.default_checkpoint_path(), torch.device("cpu")).state_dict()


# Every sampler under GLS (the main command's strategy), and the other two strategies each with a
# sampler that puts every task in every step: a strategy only combines the task losses a step has,
# so it does not depend on which sampler chose them.
def combined_in_float64(task_losses, strategy, focus="para"):
    """The study's eqs. 1, 7 and 8 on one step's task losses, recomputed in float64."""
    values = list(task_losses.values())
    gls = math.prod(values) ** (1 / len(values))
    focused = [value for task, value in task_losses.items() if task in focus.split(",")]
    return {"sum": sum(values), "gls": gls,
            "fls": gls * (math.prod(focused) ** (1 / len(focused)) if focused else 1.0)}[strategy]


@pytest.mark.parametrize("loss, sampler", [("gls", s) for s in STEPS] + [("sum", "break"), ("fls", "roundrobin")])
def test_every_sampler_and_loss_strategy_trains(tmp_path, data_dir, sampler, loss, initial_state, monkeypatch):
    """Each step's loss is its task losses combined by --loss, and the step trains every head, each
    only in the steps that have its task."""
    steps, task_losses, tables = [], {}, []
    task_loss, training_step = train.task_loss, train.training_step

    def recorded_task_loss(task, *args):
        task_losses[task] = task_loss(task, *args)
        return task_losses[task]

    def recorded_step(*args):
        task_losses.clear()
        steps.append((training_step(*args), {task: value.item() for task, value in task_losses.items()}))
        model = args[1]
        tables.append(model.encoder.word_table.grad)  # held: a freed buffer's address could come back
        for task, head in model.heads.items():  # a head without a batch has no gradient: not updated
            assert task in task_losses or all(p.grad is None for p in head.parameters()), task
        return steps[-1][0]

    monkeypatch.setattr(train, "task_loss", recorded_task_loss)
    monkeypatch.setattr(train, "training_step", recorded_step)
    out_dir, scores = run(tmp_path, data_dir, "--limit", "16", "--eval_limit", "16", "--epochs", "1",
                          "--batch_size", "8", "--lr", "1e-4", "--loss", loss, "--sampler", sampler)
    assert len(steps) == STEPS[sampler]
    assert all(grad is tables[0] for grad in tables)  # the word table's gradient: one buffer, kept
    for step_loss, step_task_losses in steps:
        assert step_loss == pytest.approx(combined_in_float64(step_task_losses, loss), rel=1e-6)
    (record,) = checkpoints.read_metrics(out_dir)
    assert record["skipped_steps"] == 0 and record["train_loss"] > 0
    assert set(scores) == {"sst", "para", "sts"}
    last = torch.load(out_dir / "last.pt", weights_only=True)
    state = last["optimizer"]["state"]
    assert int(state[0]["step"]) == STEPS[sampler]  # parameter 0, the word embeddings, is in every step
    # every head was trained (STS's has no weights: its score is the encoder's cosine)
    for name, value in initial_state.items():
        if name.startswith("heads.") or name == "encoder.embeddings.word.weight":
            assert not torch.equal(last["model"][name], value), name


def test_single_task_pretrain_only_trains_the_head(tmp_path, data_dir):
    out_dir, _ = run(tmp_path, data_dir, "--option", "pretrain", "--tasks", "cfimdb", "--limit", "16",
                     "--eval_limit", "8", "--epochs", "1", "--max_length", "64", "--pooling", "cls")
    from bert import BertModel, default_checkpoint_path
    state = torch.load(out_dir / "best.pt", weights_only=True)["model"]
    original = BertModel.from_pretrained(default_checkpoint_path()).state_dict()
    assert all(torch.equal(state["encoder." + k], v) for k, v in original.items())
    assert sorted(k for k in state if k.startswith("heads.")) == ["heads.cfimdb.bias", "heads.cfimdb.weight"]
    torch.manual_seed(11711)  # the head as main() initialised it, before the run trained it
    untrained = train.build_model(train.parse_args(["--tasks", "cfimdb"]), default_checkpoint_path(), "cpu")
    assert all(not torch.equal(state[k], untrained.state_dict()[k]) for k in ("heads.cfimdb.weight", "heads.cfimdb.bias"))


def test_the_optimizer_and_smart_flags_reach_what_they_build():
    import optim
    model = torch.nn.Linear(3, 2)
    args = train.parse_args(["--optimizer", "adabelief", "--lr", "3e-5", "--weight_decay", "0.02", "--no-fused_optimizer",
                             "--smart", "--smart_lambda", "2", "--smart_eps", "1e-3", "--smart_sigma", "2e-5",
                             "--smart_step", "4e-3", "--smart_steps", "3", "--bregman_mu", "0.5", "--bregman_beta", "0.9"])
    optimizer = train.build_optimizer(args, model)
    assert type(optimizer) is optim.AdaBelief and not optimizer.fused
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(3e-5, 0.02)]
    r = train.build_regulariser(args, model)
    assert (r.lambda_s, r.eps, r.sigma, r.step_size, r.n_steps, r.mu, r.beta) == (2, 1e-3, 2e-5, 4e-3, 3, 0.5, 0.9)
    assert type(train.build_optimizer(train.parse_args(["--no-fused_optimizer"]), model)) is optim.AdamW
    assert train.build_regulariser(train.parse_args([]), model) is None


def test_the_sampler_flags_shape_the_epoch_plan():
    """--sampler and --alpha reach the plan: SST has 25 batches of 32 and PARA 3, so sequential
    gives 25 SST steps then 3 PARA ones, and proportional draws its 28 steps about 25:3 at alpha 1
    and about 1:1 at alpha 0."""
    from types import SimpleNamespace
    data = {"sst": SimpleNamespace(lengths=[8] * 800), "para": SimpleNamespace(lengths=[8] * 96)}
    tasks_of = lambda *flags: [task for step in train.epoch_plan(train.parse_args(list(flags)), data, 0) for task in step]
    assert tasks_of("--sampler", "sequential") == ["sst"] * 25 + ["para"] * 3
    assert tasks_of("--sampler", "roundrobin") == ["sst", "para"] * 25
    proportional = [tasks_of("--sampler", "proportional", "--alpha", alpha, "--seed", str(seed)).count("para")
                    for alpha in ("1", "0") for seed in range(20)]
    assert sum(proportional[:20]) / 20 < 5 < sum(proportional[20:]) / 20  # expected 3.0 and 14.0 of 28


def test_clip_grad_is_the_max_norm_each_step_clips_to(tmp_path, data_dir, monkeypatch):
    import optim
    max_norms, clip = [], optim.clip_grad_norm
    monkeypatch.setattr(optim, "clip_grad_norm", lambda params, max_norm: (max_norms.append(max_norm), clip(params, max_norm))[1])
    for flags in (["--clip_grad", "0.5"], []):
        run(tmp_path, data_dir, "--tasks", "sst", "--limit", "16", "--eval_limit", "8", "--epochs", "1", "--batch_size", "8",
            *flags, name=f"clip{len(flags)}")
    assert max_norms == [0.5, 0.5, math.inf, math.inf]  # off: no clipping, but the norm is still checked finite


def test_fused_optimizer_trains_like_the_eager_one(tmp_path, data_dir):
    # optim.py's tests hold the compiled update equal to the eager one; here train.py wires it in.
    flags = ["--tasks", "sst", "--limit", "48", "--eval_limit", "48", "--epochs", "1", "--lr", "1e-4",
             "--batch_size", "8", "--precision", "fp32"]  # in bf16 a last-bit difference can flip a prediction
    eager_dir, eager = run(tmp_path, data_dir, *flags, "--no-fused_optimizer", name="eager")
    # asked for, so that a machine where it cannot compile fails here rather than comparing eager with eager
    fused_dir, fused = run(tmp_path, data_dir, *flags, "--fused_optimizer", name="fused")
    assert fused == eager
    first_loss = lambda out_dir: checkpoints.read_metrics(out_dir)[0]["train_loss"]
    assert first_loss(fused_dir) == pytest.approx(first_loss(eager_dir), rel=1e-5)


@pytest.mark.skipif(train.native_precision(torch.device("cpu")) != "bf16",
                    reason="no native bf16 matmul on this CPU: emulated it runs ~150x slower than float32 (measured "
                    "on an AVX2-only EPYC), hours for this test, and --precision auto picks fp32 here")
def test_bf16_autocast_trains_and_scores_as_float32_does_on_a_fixed_slice(tmp_path, data_dir):
    """--precision bf16 (auto's choice on CPUs with AVX512-BF16 or AMX) on the real checkpoint:
    the training loss falls from epoch to epoch, the losses stay within 2% of float32's, and the
    dev scores on the same slice within 0.05 of float32's (6 of 120 SST sentences; STS r 0.01)."""
    flags = ["--tasks", "sst,sts", "--sampler", "roundrobin", "--limit", "96", "--eval_limit", "120", "--epochs",
             "2", "--batch_size", "16", "--lr_schedule", "constant"]
    fp32_dir, fp32 = run(tmp_path, data_dir, *flags, "--precision", "fp32", name="fp32")
    bf16_dir, bf16 = run(tmp_path, data_dir, *flags, "--precision", "bf16", name="bf16")
    losses = {name: [m["train_loss"] for m in checkpoints.read_metrics(d)]
              for name, d in (("fp32", fp32_dir), ("bf16", bf16_dir))}
    assert losses["bf16"][1] < losses["bf16"][0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    assert bf16["sst"] == pytest.approx(fp32["sst"], abs=0.05)
    assert bf16["sts"] == pytest.approx(fp32["sts"], abs=0.01)


def test_bf16_asked_for_where_it_would_be_emulated_runs_and_says_so(tmp_path, data_dir, checkpoint_dir, monkeypatch,
                                                                      capsys):
    tiny = make_tiny_checkpoint(tmp_path / "tiny", checkpoint_dir / "vocab.txt")
    monkeypatch.setattr(train, "native_precision", lambda device: "fp32")  # as on a CPU without AVX512-BF16 or AMX
    run(tmp_path, data_dir, "--bert", str(tiny), "--tasks", "sst", "--eval_only", "--eval_limit", "4", "--max_length", "32",
        "--precision", "bf16")
    assert "--precision bf16 here is emulated" in capsys.readouterr().out


def test_compile_predicts_as_eager_does_and_keeps_the_state_names(tmp_path, data_dir, checkpoint_dir):
    """--compile (torch.compile of the encoder in place, one graph for every length on the CPU):
    the model predicts what the eager one does, to float32's rounding, on two batches of different
    lengths, and its state_dict has the same names, so its checkpoints load without --compile.
    (Forward only: compiling the backward too would cost the suite a minute.)"""
    tiny, cpu = make_tiny_checkpoint(tmp_path / "tiny", checkpoint_dir / "vocab.txt"), torch.device("cpu")
    argv = ["--data_dir", str(data_dir), "--tasks", "sst", "--max_length", "32", "--device", "cpu"]
    torch.manual_seed(0)  # the same random head on both
    eager = train.build_model(train.parse_args(argv), tiny, cpu).eval()
    torch.manual_seed(0)
    compiled = train.build_model(train.parse_args(argv + ["--compile"]), tiny, cpu).eval()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(compiled.state_dict())  # the same weights: a no-op that must not raise
    data = train.load_split(train.parse_args(argv), train.load_tokenizer(tiny), "sst", "dev", 16, cpu)
    with torch.no_grad():
        batches = [data.batch(list(rows))["inputs"] for rows in (range(4), range(4, 16))]
        assert batches[0][0]["input_ids"].shape[1] != batches[1][0]["input_ids"].shape[1]  # each cut to its longest
        for inputs in batches:
            assert torch.allclose(compiled("sst", inputs), eager("sst", inputs), atol=1e-5)


def test_linear_schedule_lowers_the_learning_rate_to_nearly_zero(tmp_path, data_dir):
    flags = ["--tasks", "sst", "--limit", "24", "--eval_limit", "8", "--max_length", "32", "--batch_size", "8",
             "--lr", "1e-4", "--epochs", "2", "--lr_schedule", "linear"]
    out_dir, _ = run(tmp_path, data_dir, *flags)  # 3 steps an epoch: the last step is 5 of 6 done
    last = torch.load(out_dir / "last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * (1 - 5 / 6))
    constant_dir, _ = run(tmp_path, data_dir, *flags[:-2], "--lr_schedule", "constant", name="constant")
    constant = torch.load(constant_dir / "last.pt", weights_only=True)
    assert constant["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert not torch.equal(last["model"]["heads.sst.weight"], constant["model"]["heads.sst.weight"])
    # the epochs set the schedule: a resumed run may not change them
    with pytest.raises(train.RunError, match="--epochs 2; under its --lr_schedule linear"):
        run(tmp_path, data_dir, *flags[:-4], "--epochs", "3", *flags[-2:], "--resume")


def test_warmup_raises_the_rate_from_zero_then_the_schedule_takes_the_rest():
    linear = train.parse_args(["--lr", "1e-4", "--warmup", "0.1"])
    assert [train.learning_rate(linear, done) for done in (0.0, 0.05, 0.1)] == pytest.approx([0.0, 5e-5, 1e-4])
    assert train.learning_rate(linear, 0.55) == pytest.approx(5e-5)  # halfway down the remaining 0.9
    constant = train.parse_args(["--lr", "1e-4", "--warmup", "0.1", "--lr_schedule", "constant"])
    assert [train.learning_rate(constant, done) for done in (0.05, 0.5, 0.99)] == pytest.approx([5e-5, 1e-4, 1e-4])
    plain = train.parse_args(["--lr", "1e-4"])
    assert train.learning_rate(plain, 0.0) == 1e-4 and train.learning_rate(plain, 0.75) == pytest.approx(2.5e-5)


def test_resume_takes_the_runs_flags_from_last_pt(tmp_path, data_dir):
    flags = ["--tasks", "sst", "--limit", "16", "--eval_limit", "8", "--max_length", "32", "--batch_size", "8",
             "--epochs", "1", "--lr_schedule", "constant", "--lr", "3e-4"]
    out_dir, _ = run(tmp_path, data_dir, *flags)
    # the run's folder and a longer run are all it takes: its flags come from last.pt
    train.main(["--resume", "--out_dir", str(out_dir), "--data_dir", str(data_dir), "--epochs", "2"])
    assert [m["epoch"] for m in checkpoints.read_metrics(out_dir)] == [1, 2]
    resumed = json.loads((out_dir / "args.json").read_text())
    assert (resumed["tasks"], resumed["limit"], resumed["lr"], resumed["epochs"]) == (["sst"], 16, 3e-4, 2)
    with pytest.raises(train.RunError, match=r"saved with --lr 0\.0003, not 0\.001; resume with the run's own"):
        train.main(["--resume", "--out_dir", str(out_dir), "--data_dir", str(data_dir), "--epochs", "3", "--lr", "1e-3"])
    with pytest.raises(train.RunError, match="holds a finished run of 2 epochs, nothing to resume"):
        train.main(["--resume", "--out_dir", str(out_dir), "--data_dir", str(data_dir)])
    warm_dir, _ = run(tmp_path, data_dir, *flags, "--warmup", "0.5", name="warmup")
    with pytest.raises(train.RunError, match=r"under its --lr_schedule constant \(and --warmup 0\.5\) the epochs"):
        train.main(["--resume", "--out_dir", str(warm_dir), "--data_dir", str(data_dir), "--epochs", "2"])


def run_files(folder):
    """conftest.snapshot of a run's folder, but for the evaluations' own folders inside it."""
    return {path: data for path, data in snapshot(folder).items() if not path.startswith("eval-")}


def test_eval_only_never_overwrites_a_run(tmp_path, data_dir, monkeypatch):
    # `python train.py --tasks sst`, then `python train.py --tasks sst --eval_only`, with their
    # default folders (runs/... under the working directory)
    monkeypatch.chdir(tmp_path)
    flags = ["--data_dir", str(data_dir), "--tasks", "sst", "--limit", "16", "--eval_limit", "24", "--epochs", "1",
             "--device", "cpu"]
    trained = train.main(flags)
    run_dir = tmp_path / train.parse_args(flags).out_dir
    before = run_files(run_dir)
    assert "scores.json" in before and "predictions/sst-dev-output.csv" in before
    train.main(flags + ["--eval_only"])  # the released encoder, an untrained head: into a folder of its own
    assert run_files(run_dir) == before
    assert (tmp_path / "runs" / "eval-sst-released" / "predictions" / "sst-dev-output.csv").is_file()
    again = train.main(flags + ["--eval_only", "--checkpoint", str(run_dir / "best.pt")])  # into run_dir/eval-best
    assert again == trained and run_files(run_dir) == before
    assert (run_dir / "eval-best" / "predictions" / "sst-dev-output.csv").read_bytes() == \
        before["predictions/sst-dev-output.csv"]
    for second in (flags + ["--eval_only"], flags):  # the same commands again: refused, nothing touched
        with pytest.raises(train.RunError, match="already holds a run"):
            train.main(second)
    assert run_files(run_dir) == before


def released_encoder_sts_predictions(examples):
    """5·cos, clipped to 0..5, of each pair's mean-pooled token vectors from transformers' BertModel
    on the released checkpoint: what scoring the encoder as released means, computed independently."""
    import transformers
    checkpoint = str(train.default_checkpoint_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.BertModel.from_pretrained(checkpoint).eval()

    def embedded(texts):
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            tokens = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        return (tokens * mask).sum(1) / mask.sum(1)
    cosines = torch.nn.functional.cosine_similarity(embedded([e.text for e in examples]),
                                                    embedded([e.pair for e in examples]), dim=-1)
    return (5 * cosines).clamp(0, 5)


def test_eval_only_without_a_checkpoint_scores_the_encoder_as_released(tmp_path, data_dir):
    """The STS head has no weights, so this is the checkpoint's zero-shot STS score (the study's
    "pretrain" row for STS): each prediction is transformers' 5·cos, and r is theirs to 1e-5."""
    out_dir, scores = run(tmp_path, data_dir, "--tasks", "sts", "--eval_only", "--eval_limit", "200",
                          "--precision", "fp32")
    examples = tasks.read_examples(data_dir, "sts", "dev")[:200]
    expected = released_encoder_sts_predictions(examples)
    rows = [line.split(" , ") for line in (out_dir / "predictions" / "sts-dev-output.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == [e.id for e in examples]
    # the file holds 4 decimals: each row within their rounding (5e-5) and the forward's 1e-5
    torch.testing.assert_close(torch.tensor([float(r[1]) for r in rows]), expected, rtol=0, atol=6e-5)
    assert scores["sts"] == pytest.approx(tasks.pearson_r(expected, [e.label for e in examples]), abs=1e-5)
    assert json.loads((out_dir / "scores.json").read_text())["dev"] == scores
