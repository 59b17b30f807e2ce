"""Specification of distill.py and of train.py --teachers: the distilled losses equal their closed
forms (λ = 1 is the plain loss exactly, λ = 0 the loss against the teacher alone, the ensemble the
mean of its teachers), each training batch meets its own examples' teacher targets whatever the
sampler and --limit, the gold share λ follows the optimizer steps across a kill and --resume, and
a teacher that does not fit stops the run with one line and exit status 2, nothing written.

The teachers are runs of a tiny random BERT (conftest.TINY_BERT): the properties do not
depend on the model's size."""
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import distill
import tasks
import train
from conftest import assert_same_run, snapshot

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the losses

def test_gold_share_rises_from_0_to_1_when_annealed_and_stays_fixed_otherwise():
    assert [distill.gold_share("linear", 0.5, done) for done in (0, 0.25, 1)] == [0, 0.25, 1]
    assert distill.gold_share("none", 0.3, 0.9) == pytest.approx(0.7)


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_with_lambda_1_the_distilled_loss_is_the_plain_loss_exactly(task):
    torch.manual_seed(0)
    outputs, labels, teacher = random_batch(task)
    assert torch.equal(train.task_loss(task, outputs, labels, teacher, 1.0), train.task_loss(task, outputs, labels))


def random_batch(task, n=6):
    if task == "sst":
        return torch.randn(n, 5), torch.randint(0, 5, (n,)), torch.randn(n, 5).softmax(-1)
    if task == "para":
        return torch.randn(n), torch.randint(0, 2, (n,)).float(), torch.rand(n)
    return torch.rand(n) * 2 - 1, torch.rand(n) * 5, torch.rand(n) * 5


@pytest.mark.parametrize("gold", [0.0, 0.3])
def test_classification_losses_are_kl_from_the_mixed_target_in_float64(gold):
    """KL(q || p) = sum_c q_c (log q_c - log p_c), q = λ one-hot + (1 - λ) teacher, recomputed in
    float64; with --distill_loss ce it is KL + H(q); its gradient in the logits is p - q."""
    torch.manual_seed(1)
    logits, labels, teacher = random_batch("sst")
    logits.requires_grad_()
    q = gold * F.one_hot(labels, 5).double() + (1 - gold) * teacher.double()
    log_p = logits.double().log_softmax(-1)
    kl = (torch.special.xlogy(q, q) - q * log_p).sum(-1).mean()
    loss = train.task_loss("sst", logits, labels, teacher, gold)
    assert loss.item() == pytest.approx(kl.item(), rel=1e-6)
    entropy = -torch.special.xlogy(q, q).sum(-1).mean()
    assert train.task_loss("sst", logits, labels, teacher, gold, "ce").item() == pytest.approx((kl + entropy).item(),
                                                                                             rel=1e-6)
    loss.backward()
    expected = (log_p.exp() - q) / len(labels)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-7)
    # KL is 0 when the student predicts the target: what lets it fall to 0 as the plain loss does
    assert train.task_loss("sst", q.log().float(), labels, teacher, gold).item() == pytest.approx(0, abs=1e-6)


def test_para_is_binary_kl_and_sts_the_squared_error_to_the_mixed_score():
    torch.manual_seed(2)
    logit, labels, teacher = random_batch("para")
    q = (0.4 * labels + 0.6 * teacher).double()
    p = logit.double().sigmoid()
    kl = (torch.special.xlogy(q, q) + torch.special.xlogy(1 - q, 1 - q) - q * p.log() - (1 - q) * (1 - p).log()).mean()
    assert train.task_loss("para", logit, labels, teacher, 0.4).item() == pytest.approx(kl.item(), rel=1e-6)
    cosine, scores, teacher = random_batch("sts")
    expected = ((5 * cosine.double() - (0.4 * scores + 0.6 * teacher).double()) ** 2).mean()
    assert train.task_loss("sts", cosine, scores, teacher, 0.4).item() == pytest.approx(expected.item(), rel=1e-6)
    # λ = 0: the teacher's score alone
    assert train.task_loss("sts", cosine, scores, teacher, 0.0).item() == pytest.approx(
        ((5 * cosine.double() - teacher.double()) ** 2).mean().item(), rel=1e-6)


def test_an_ensemble_target_is_the_mean_of_the_teachers_that_teach_each_example():
    a, b = torch.rand(4, 5).softmax(-1), torch.rand(4, 5).softmax(-1)
    data = SimpleNamespace(task="sst", examples=[SimpleNamespace(id=f"e{i}") for i in range(4)])
    torch.testing.assert_close(distill.ensemble([a, b], data), (a + b) / 2, rtol=0, atol=0)
    a[:2], b[2:] = torch.nan, torch.nan  # two --fold teachers, each teaching two examples
    assert torch.equal(distill.ensemble([a, b], data), torch.cat([b[:2], a[2:]]))
    a[3] = torch.nan  # now e3 has no teacher
    with pytest.raises(distill.TeacherError, match=r"give no sst target for example 'e3' \(and 0 more\)"):
        distill.ensemble([a, b], data)


# ----------------------------------------------------------------------------- teachers and students

COMMON = ["--limit", "40", "--batch_size", "8", "--max_length", "32", "--eval_limit", "8", "--lr", "1e-3",
          "--device", "cpu", "--precision", "fp32"]


def flags(data_dir, tiny, out_dir, *more):
    return ["--data_dir", str(data_dir), "--bert", str(tiny), "--out_dir", str(out_dir), *COMMON, *more]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, data_dir, tiny):
    """Finished single-task runs: two SST teachers (seeds 1, 2), one STS teacher, and two SST
    teachers each trained without one of two folds."""
    folder = tmp_path_factory.mktemp("teachers")
    for name, more in {"sst-1": ["--tasks", "sst", "--seed", "1"], "sst-2": ["--tasks", "sst", "--seed", "2"],
                       "sts": ["--tasks", "sts", "--seed", "1"], "sst-fold0": ["--tasks", "sst", "--fold", "0/2"],
                       "sst-fold1": ["--tasks", "sst", "--fold", "1/2"]}.items():
        train.main(flags(data_dir, tiny, folder / name, "--epochs", "1", *more))
    return folder


def teacher_predictions(data_dir, tiny, folder, data, bf16=False):
    """What a teacher predicts for each example of `data`, computed here from its best.pt."""
    args = json.loads((folder / "args.json").read_text())
    model = tasks.MultitaskBert(train.BertModel.from_pretrained(tiny), args["tasks"], 0.0, args["pooling"])
    model.load_state_dict(torch.load(folder / "best.pt", weights_only=True)["model"])
    return distill.soft_targets(model, data, 64, lambda: torch.autocast("cpu", torch.bfloat16, enabled=bf16))


@pytest.mark.parametrize("more", [["--sampler", "roundrobin"], ["--sampler", "sequential", "--loss", "gls"],
                                  ["--sampler", "break"], ["--sampler", "proportional"],
                                  ["--sampler", "roundrobin", "--smart"], ["--sampler", "roundrobin", "--precision", "bf16"],
                                  ["--sampler", "roundrobin", "--distill_anneal", "none", "--distill_weight", "0.3"]],
                         ids=lambda more: " ".join(more))
def test_every_batch_meets_its_own_examples_teacher_targets(tmp_path, data_dir, tiny, teachers, monkeypatch, more):
    """Under every sampler (shuffled, over a seeded --limit sample), the sum (the default) and GLS,
    SMART and bf16: each step's teacher rows are the ensemble of the two SST teachers (and the STS
    teacher) for exactly that batch's example ids, and λ rises from 0 with the steps (or, with
    --distill_anneal none, stays at 1 - --distill_weight)."""
    seen, real_step = [], train.training_step

    def recording(args, model, optimizer, regulariser, params, batches, shares, device, gold_share=1.0):
        seen.append(({task: (b["inputs"], b.get("teacher")) for task, b in batches.items()}, gold_share))
        return real_step(args, model, optimizer, regulariser, params, batches, shares, device, gold_share)
    monkeypatch.setattr(train, "training_step", recording)
    out_dir = tmp_path / "student"
    teacher_dirs = ",".join(str(teachers / name) for name in ("sst-1", "sst-2", "sts"))
    train.main(flags(data_dir, tiny, out_dir, "--tasks", "sst,sts", "--epochs", "1", "--limit", "30",
                     "--teachers", teacher_dirs, *more))
    args = train.parse_args(flags(data_dir, tiny, out_dir, "--tasks", "sst,sts", "--limit", "30"))
    tokenizer = train.load_tokenizer(Path(tiny))
    for task, names in (("sst", ["sst-1", "sst-2"]), ("sts", ["sts"])):
        data = train.load_split(args, tokenizer, task, "train", 30, CPU)
        expected = distill.ensemble([teacher_predictions(data_dir, tiny, teachers / n, data, "bf16" in more)
                                     for n in names], data)
        by_ids = {tuple(data.encodings[0][i][0]): expected[i] for i in range(len(data))}
        checked = 0
        for step in (step for step, _ in seen if task in step):  # sequential, proportional: a task a step
            inputs, teacher = step[task]
            ids, mask = inputs[0]["input_ids"], inputs[0]["attention_mask"]
            for row in range(len(ids)):
                key = tuple(ids[row][mask[row] == 1].tolist())
                torch.testing.assert_close(teacher[row], by_ids[key], rtol=1e-6, atol=1e-7)
                checked += 1
        # every example is seen (round-robin cycles the shorter task); proportional draws its batches
        # at random, so there the check is only that the task had steps to check
        assert checked >= (1 if "proportional" in more else len(data))
    golds = [gold for _, gold in seen]
    if "none" in more:
        assert golds == [pytest.approx(0.7)] * len(seen)
    else:
        assert golds[0] == 0 and golds == sorted(golds) and golds[-1] < 1  # λ = done, from the first step on
    saved = torch.load(out_dir / "teachers.pt", weights_only=True)
    assert sorted(saved) == ["sst", "sts"] and len(saved["sst"]) == 30


def test_lambda_and_the_targets_survive_a_stop_and_resume_bit_for_bit(tmp_path, data_dir, tiny, teachers,
                                                                      monkeypatch, capsys):
    """Stopped in the middle of an epoch and resumed, a student ends as the run never stopped:
    the same λ at every step, the same targets (read back from teachers.pt), the same files."""
    more = ["--tasks", "sst,sts", "--sampler", "roundrobin", "--epochs", "2", "--save_every", "2", "--teachers",
            f"{teachers / 'sst-1'},{teachers / 'sts'}", "--lr_schedule", "constant"]
    whole = tmp_path / "whole"
    train.main(flags(data_dir, tiny, whole, *more))
    stopped, real_step, calls = tmp_path / "stopped", train.training_step, [0]

    def stop_at_call_8(*args, **kwargs):  # 5 steps an epoch: the 3rd of epoch 2, after its save at step 2
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train, "training_step", stop_at_call_8)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags(data_dir, tiny, stopped, *more))
    monkeypatch.setattr(train, "training_step", real_step)
    capsys.readouterr()
    train.main(flags(data_dir, tiny, stopped, *more, "--resume"))
    assert "epoch 2, step 2" in capsys.readouterr().out
    assert_same_run(whole, stopped)
    assert (whole / "teachers.pt").read_bytes() == (stopped / "teachers.pt").read_bytes()


def test_folds_split_the_examples_by_id_into_parts_of_about_equal_size(data_dir):
    ids = [e.id for e in tasks.read_examples(data_dir, "sst", "train", report=lambda _: None)]
    counts = Counter(tasks.fold_of(i, 5) for i in ids)
    assert sorted(counts) == [0, 1, 2, 3, 4]
    assert all(abs(count - len(ids) / 5) < 5 * (len(ids) * 0.2 * 0.8) ** 0.5 for count in counts.values())


@pytest.mark.parametrize("limit", [None, 30])
def test_a_fold_run_trains_on_the_examples_outside_its_fold_alone(data_dir, tiny, limit):
    args = train.parse_args(flags(data_dir, tiny, "unused", "--tasks", "sst", "--fold", "1/3"))
    kept = [e.id for e in train.load_split(args, train.load_tokenizer(Path(tiny)), "sst", "train", limit, CPU).examples]
    outside = [e.id for e in tasks.read_examples(data_dir, "sst", "train", report=lambda _: None)
               if tasks.fold_of(e.id, 3) != 1]
    assert kept == outside if limit is None else (len(kept) == limit and set(kept) <= set(outside))


@pytest.mark.parametrize("fold", ["2/2", "0/1", "a/3", "1"])
def test_a_malformed_fold_is_a_usage_error(fold, capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--fold", fold])
    assert exit.value.code == 2 and f"--fold {fold}: expected K/N" in capsys.readouterr().err


def test_fold_teachers_teach_each_example_what_the_one_that_never_saw_it_predicts(tmp_path, data_dir, tiny, teachers):
    out_dir = tmp_path / "student"
    train.main(flags(data_dir, tiny, out_dir, "--tasks", "sst", "--epochs", "1",
                     "--teachers", f"{teachers / 'sst-fold0'},{teachers / 'sst-fold1'}"))
    saved = torch.load(out_dir / "teachers.pt", weights_only=True)["sst"]
    args = train.parse_args(flags(data_dir, tiny, out_dir, "--tasks", "sst"))
    data = train.load_split(args, train.load_tokenizer(Path(tiny)), "sst", "train", 40, CPU)
    taught = Counter()
    for k in (0, 1):
        predicted = teacher_predictions(data_dir, tiny, teachers / f"sst-fold{k}", data)  # on every example
        for i, example in enumerate(data.examples):
            if tasks.fold_of(example.id, 2) == k:
                torch.testing.assert_close(saved[example.id], predicted[i], rtol=1e-6, atol=1e-7)
                taught[k] += 1
    assert sum(taught.values()) == len(saved) == 40 and min(taught.values()) > 5


# ----------------------------------------------------------------------------- teachers that do not fit

def replace_file(folder, name, text):
    (folder / name).write_text(text)
    return folder


@pytest.fixture
def bad_teachers(tmp_path, teachers, data_dir):
    """name -> (student flags given the teacher, the error line expected)."""
    def copy(name, source="sst-1"):
        return Path(shutil.copytree(teachers / source, tmp_path / name))
    unfinished = copy("unfinished")
    (unfinished / "scores.json").unlink()
    other_vocab = copy("other-vocab")
    scores = json.loads((other_vocab / "scores.json").read_text())
    scores["fingerprint"]["checkpoint"] = "0" * 64
    replace_file(other_vocab, "scores.json", json.dumps(scores))
    changed = copy("changed-data")
    scores = json.loads((changed / "scores.json").read_text())
    scores["fingerprint"]["train_files"]["sst"] = "f" * 64
    replace_file(changed, "scores.json", json.dumps(scores))
    damaged = replace_file(copy("damaged"), "args.json", '{"tasks": ["sst"')
    scored_only = copy("scored-only")  # what --eval_only leaves: scores, but no training behind them
    replace_file(scored_only, "args.json", json.dumps({**json.loads((scored_only / "args.json").read_text()), "eval_only": True}))
    return {
        "not a finished run": (["--teachers", str(unfinished)], r"unfinished: not a finished train\.py run \(no scores\.json\)"),
        "another checkpoint": (["--teachers", str(other_vocab)], r"trained from another checkpoint or vocabulary"),
        "a task the student does not train": (["--tasks", "sts", "--teachers", str(teachers / "sst-1")],
                                              r"teaches sst, which the student does not train"),
        "a changed training file": (["--teachers", str(changed)], r"the sst training file has changed since"),
        "not a folder": (["--teachers", str(tmp_path / "nowhere")], r"nowhere: not a finished train\.py run"),
        "a damaged args.json": (["--teachers", str(damaged)], r"damaged: args\.json or scores\.json is not valid JSON"),
        "an --eval_only run": (["--teachers", str(scored_only)], r"scored-only: not a training run of this train\.py"),
        "a fold without its twin": (["--teachers", str(teachers / "sst-fold0")],
                                    r"give no sst target for example '.*' \(and \d+ more\): give a --fold teacher"),
    }


@pytest.mark.parametrize("case", ["not a finished run", "another checkpoint", "a task the student does not train",
                                  "a changed training file", "not a folder", "a damaged args.json", "an --eval_only run",
                                  "a fold without its twin"])
def test_a_teacher_that_does_not_fit_is_one_line_exit_2_and_nothing_written(tmp_path, data_dir, tiny, bad_teachers,
                                                                             case):
    more, message = bad_teachers[case]
    out_dir = tmp_path / "student"
    command = [sys.executable, str(ROOT / "train.py"), *flags(data_dir, tiny, out_dir, "--tasks", "sst,sts", "--epochs",
                                                             "1", *more)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: --teachers ") and re.search(message, line), line
    assert snapshot(out_dir) is None


def test_a_resumed_student_whose_cache_lacks_an_example_is_refused(tmp_path, data_dir, tiny, teachers, monkeypatch,
                                                                   capsys):
    out_dir = tmp_path / "student"
    more = ["--tasks", "sst", "--epochs", "1", "--save_every", "2", "--teachers", str(teachers / "sst-1")]

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "training_step", stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags(data_dir, tiny, out_dir, *more))
    cache = torch.load(out_dir / "teachers.pt", weights_only=True)
    dropped = sorted(cache["sst"])[0]
    del cache["sst"][dropped]
    torch.save(cache, out_dir / "teachers.pt")
    before = snapshot(out_dir)
    capsys.readouterr()  # the first run's progress bars
    monkeypatch.setattr(sys, "argv", ["train.py", *flags(data_dir, tiny, out_dir, *more, "--resume")])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"error: .*teachers\.pt: no sst teacher target for example id '{re.escape(dropped)}' "
                        r"\(and 0 more\): it was made for other training data", line), line
    assert snapshot(out_dir) == before
