"""Specification of train.py, end to end on a slice of the real data with the real checkpoint:
the loss falls, every sampler and loss strategy runs, and the leaderboard files are complete."""
import json

import pytest

import tasks
import train


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
    metrics = train.read_metrics(out_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert set(scores) == {"sst", "para", "sts"}
    assert (out_dir / "best.pt").is_file() and (out_dir / "last.pt").is_file()
    for task in ("sst", "para", "sts"):
        for split in ("dev", "test-student"):
            ids = [e.id for e in tasks.read_examples(data_dir, task, split)[:40]]
            name = "test" if split == "test-student" else "dev"
            check_prediction_file(out_dir / "predictions" / f"{task}-{name}-output.csv", task, ids)


@pytest.mark.parametrize("sampler", ["sequential", "break", "roundrobin", "proportional"])
@pytest.mark.parametrize("loss", ["sum", "gls", "fls"])
def test_every_sampler_and_loss_strategy_trains(tmp_path, data_dir, sampler, loss):
    out_dir, scores = run(tmp_path, data_dir, "--limit", "16", "--eval_limit", "16", "--epochs", "1",
                          "--batch_size", "8", "--lr", "1e-4", "--loss", loss, "--sampler", sampler)
    (record,) = train.read_metrics(out_dir)
    assert record["skipped_steps"] == 0
    assert 0 < record["train_loss"] < 10
    assert set(scores) == {"sst", "para", "sts"}


def test_single_task_pretrain_only_trains_the_head(tmp_path, data_dir):
    import torch
    out_dir, _ = run(tmp_path, data_dir, "--option", "pretrain", "--tasks", "cfimdb", "--limit", "16",
                     "--eval_limit", "8", "--epochs", "1", "--max_length", "64", "--pooling", "cls")
    from bert import BertModel, default_checkpoint_path
    state = torch.load(out_dir / "best.pt", weights_only=True)["model"]
    original = BertModel.from_pretrained(default_checkpoint_path()).state_dict()
    assert all(torch.equal(state["encoder." + k], v) for k, v in original.items())
    assert sorted(k for k in state if k.startswith("heads.")) == ["heads.cfimdb.bias", "heads.cfimdb.weight"]


def test_fused_optimizer_trains_like_the_foreach_one(tmp_path, data_dir):
    # optim.py's tests hold the two updates equal to float rounding; here train.py wires it in.
    flags = ["--tasks", "sst", "--limit", "48", "--eval_limit", "48", "--epochs", "1", "--lr", "1e-4",
             "--batch_size", "8"]
    foreach_dir, foreach = run(tmp_path, data_dir, *flags, name="foreach")
    fused_dir, fused = run(tmp_path, data_dir, *flags, "--fused_optimizer", name="fused")
    assert fused == foreach
    assert train.read_metrics(fused_dir)[0]["train_loss"] == pytest.approx(train.read_metrics(foreach_dir)[0]["train_loss"], rel=1e-5)


def test_linear_schedule_lowers_the_learning_rate_to_nearly_zero(tmp_path, data_dir):
    import torch
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
    with pytest.raises(train.RunError, match="--epochs 2; with --lr_schedule linear"):
        run(tmp_path, data_dir, *flags[:-4], "--epochs", "3", *flags[-2:], "--resume")


def test_warmup_raises_the_rate_from_zero_then_the_schedule_takes_the_rest():
    linear = train.parse_args(["--lr", "1e-4", "--warmup", "0.1"])
    assert [train.learning_rate(linear, done) for done in (0.0, 0.05, 0.1)] == pytest.approx([0.0, 5e-5, 1e-4])
    assert train.learning_rate(linear, 0.55) == pytest.approx(5e-5)  # halfway down the remaining 0.9
    constant = train.parse_args(["--lr", "1e-4", "--warmup", "0.1", "--lr_schedule", "constant"])
    assert [train.learning_rate(constant, done) for done in (0.05, 0.5, 0.99)] == pytest.approx([5e-5, 1e-4, 1e-4])
    plain = train.parse_args(["--lr", "1e-4"])
    assert train.learning_rate(plain, 0.0) == 1e-4 and train.learning_rate(plain, 0.75) == pytest.approx(2.5e-5)


def test_layer_decay_gives_each_depth_its_own_rate(tmp_path, data_dir):
    import torch
    args = train.parse_args(["--layer_decay", "0.5"])
    model = train.build_model(args, train.default_checkpoint_path(), torch.device("cpu"))
    groups = train.parameter_groups(args, model)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["heads.sst.weight"])] == 1.0
    assert scale[id(params["encoder.layers.5.ffn_out.weight"])] == 0.5  # the top layer of 6
    assert scale[id(params["encoder.layers.0.attention.qkv.weight"])] == 0.5 ** 6
    assert scale[id(params["encoder.embeddings.word.weight"])] == 0.5 ** 7
    # train.py sets each group's rate from the schedule times its scale
    out_dir, _ = run(tmp_path, data_dir, "--tasks", "sst", "--limit", "16", "--eval_limit", "8", "--epochs", "1",
                     "--batch_size", "8", "--max_length", "32", "--layer_decay", "0.5", "--lr_schedule", "constant")
    saved = torch.load(out_dir / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert sorted(g["lr"] for g in saved) == pytest.approx(sorted(1e-4 * 0.5 ** d for d in range(8)))


def test_swap_pairs_trains_para_one_order_a_step_and_scores_both(tmp_path, data_dir, monkeypatch):
    batches = []  # (task, order asked for, encodings in the batch)
    original = tasks.TaskData.batch

    def recording_batch(self, indices, order=None):
        batch = original(self, indices, order)
        batches.append((self.task, order, len(batch["inputs"])))
        return batch

    monkeypatch.setattr(tasks.TaskData, "batch", recording_batch)
    run(tmp_path, data_dir, "--tasks", "para,sst", "--swap_pairs", "--limit", "24", "--eval_limit", "8", "--epochs",
        "1", "--batch_size", "8", "--max_length", "32", "--sampler", "roundrobin")
    para = [(order, n) for task, order, n in batches if task == "para"]
    assert para[:3] == [(0, 1), (1, 1), (0, 1)]  # training, 3 steps: one order a step, alternating
    assert para[3:] and set(para[3:]) == {(None, 2)}  # dev and test: both orders, every batch
    assert {(order, n) for task, order, n in batches if task == "sst"} == {(None, 1)}


def test_resuming_a_run_saved_before_a_flag_existed_takes_it_as_off(tmp_path, data_dir):
    import torch
    flags = ["--tasks", "sst", "--limit", "16", "--eval_limit", "8", "--max_length", "32", "--batch_size", "8",
             "--epochs", "1", "--lr_schedule", "constant"]
    out_dir, _ = run(tmp_path, data_dir, *flags)
    last = torch.load(out_dir / "last.pt", weights_only=True)
    for name in ("warmup", "layer_decay", "swap_pairs"):  # as a last.pt from before these flags
        del last["args"][name]
    for group in last["optimizer"]["param_groups"]:
        del group["lr_scale"]
    torch.save(last, out_dir / "last.pt")
    with pytest.raises(train.RunError, match="saved with --warmup 0.0, not 0.1"):
        run(tmp_path, data_dir, *flags, "--warmup", "0.1", "--resume")
    longer = [*flags[:-4], "--epochs", "2", "--lr_schedule", "constant"]
    run(tmp_path, data_dir, *longer, "--resume")  # at a constant rate a run may be extended
    assert [m["epoch"] for m in train.read_metrics(out_dir)] == [1, 2]
    run(tmp_path, data_dir, *flags, "--warmup", "0.5", name="warmup")
    with pytest.raises(train.RunError, match="with --warmup 0.5 the epochs set the schedule"):
        run(tmp_path, data_dir, *longer, "--warmup", "0.5", "--resume", name="warmup")


def test_eval_only_reproduces_the_best_checkpoints_scores(tmp_path, data_dir):
    flags = ["--tasks", "sst", "--limit", "16", "--eval_limit", "24", "--epochs", "1"]
    out_dir, scores = run(tmp_path, data_dir, *flags)
    _, again = run(tmp_path, data_dir, *flags, "--eval_only", "--checkpoint", str(out_dir / "best.pt"), name="eval")
    assert again == scores


def test_eval_only_without_a_checkpoint_scores_the_encoder_as_released(tmp_path, data_dir):
    # The STS head has no weights, so this is the checkpoint's zero-shot STS score (the study's
    # "pretrain" row for STS); all-MiniLM-L6-v2 was trained for sentence similarity, so r is high.
    out_dir, scores = run(tmp_path, data_dir, "--tasks", "sts", "--eval_only", "--eval_limit", "200")
    assert scores["sts"] > 0.75
    assert json.loads((out_dir / "scores.json").read_text())["dev"] == scores
    assert len((out_dir / "predictions" / "sts-dev-output.csv").read_text().splitlines()) == 201
