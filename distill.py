"""Knowledge distillation: finished single-task runs teach the multi-task student.

The study's open problem is that its multi-task model trails its single-task ones, and it names
distillation from single-task teachers (Liu et al. 2019) as the way to close the gap. Two recipes:

Teacher annealing (Clark et al. 2019, "BAM! Born-Again Multi-Task Networks"): each
task's target mixes the gold label with the teacher's prediction,

    target = λ · gold + (1 - λ) · teacher,    λ = the fraction of the run's optimizer steps done,

so the student starts by imitating its teachers and ends learning from the gold labels alone.
Ensemble teachers (Liu et al. 2019, "Improving Multi-Task Deep Neural Networks via Knowledge
Distillation for Natural Language Understanding"): several teachers of one task (runs
with other seeds) are averaged into the soft target, and the mix stays fixed (`--distill_anneal
none`: λ = 1 - --distill_weight, 0.5 by default).

What a teacher predicts, per task, is what its head's loss compares with the gold label: class
probabilities softmax(z) for SST and CFIMDB (the gold one-hot mixed with them), the probability
σ(z) of a paraphrase for PARA, and the head's score 5 · cos for STS. The student's loss is then
its task loss against the mixed target (losses.py: soft cross-entropy, with --distill_loss kl
minus the target's entropy). No temperature: the probabilities are the teachers' own softmax.

The teachers predict once, at the start, on the student's own training examples, in eval mode.
Their targets are kept in <out_dir>/teachers.pt by example id, so a resumed run reads exactly
the targets it began with and every sampler, --limit and torchrun rank looks them up the same way.

A teacher is a finished train.py run folder (scores.json, args.json, best.pt), trained on the
student's checkpoint and on the same training files: scores.json records a fingerprint of both.

Out of fold. A teacher predicts its own training set in-sample: after fitting it, close to the
gold labels, which leaves the student little to learn beyond them. How close depends on the task;
the default single-task teachers (best epochs of `train.py --tasks X`, seed 11711) agree with the
gold label on 74% of SST's training sentences (mean top probability 0.64: not near one-hot), on
96% of PARA's pairs (mean confidence 0.93), and STS's scores follow the gold ones at r = 0.977.
Teachers run with --fold k/n train without fold k (tasks.fold_of: by example id) and teach only
that fold, where their predictions are out of sample; n of them, k = 0 .. n-1, cover every
training example once. Teachers of one task are averaged where they teach, and every example
must have one. Out of fold (five folds, seed 11711), the targets are as far from gold as the
teachers' dev scores say: 50% agreement on SST (mean top probability 0.62), 83% on PARA (0.92),
r = 0.881 on STS. A student annealed from them did not measurably beat one taught in-sample
(results/README.md, "Distillation"), so in-sample teachers, three runs instead of fifteen, are
what the study's main distillation rows use.
"""
import hashlib
import json
from pathlib import Path

import torch

import losses
import tasks


class TeacherError(ValueError):
    """A teacher folder that does not fit the student; the message is one line a user can act on."""


# ----------------------------------------------------------------------------- fingerprints

def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(checkpoint_dir, data_dir, train_tasks):
    """What a run was trained on: its checkpoint (config.json and vocab.txt; the weights are the
    checkpoint's own business) and each training file. Saved in scores.json, checked by students."""
    checkpoint = hashlib.sha256(b"".join(Path(checkpoint_dir, name).read_bytes()
                                         for name in ("config.json", "vocab.txt"))).hexdigest()
    return {"checkpoint": checkpoint,
            "train_files": {task: file_digest(tasks.data_path(data_dir, task, "train")) for task in train_tasks}}


# ----------------------------------------------------------------------------- teachers

def read_teacher(folder, student_tasks, student_fingerprint):
    """The teacher run's saved flags, after checking that it fits the student; else TeacherError."""
    folder = Path(folder)
    for name in ("scores.json", "args.json", "best.pt"):
        if not (folder / name).is_file():
            raise TeacherError(f"--teachers {folder}: not a finished train.py run (no {name})")
    try:
        args, scores = json.loads((folder / "args.json").read_text()), json.loads((folder / "scores.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TeacherError(f"--teachers {folder}: args.json or scores.json is not valid JSON") from None
    if args.get("eval_only") or "fingerprint" not in scores:
        raise TeacherError(f"--teachers {folder}: not a training run of this train.py (no fingerprint in scores.json)")
    others = [task for task in args["tasks"] if task not in student_tasks]
    if others:
        raise TeacherError(f"--teachers {folder}: teaches {others[0]}, which the student does not train")
    theirs = scores["fingerprint"]
    if theirs["checkpoint"] != student_fingerprint["checkpoint"]:
        raise TeacherError(f"--teachers {folder}: trained from another checkpoint or vocabulary than --bert")
    for task in args["tasks"]:
        if theirs["train_files"].get(task) != student_fingerprint["train_files"][task]:
            raise TeacherError(f"--teachers {folder}: the {task} training file has changed since the teacher ran")
    return args


@torch.no_grad()
def soft_targets(model, data, batch_size, autocast, fold=None):
    """The teacher's target for every example of `data`, in its order: class probabilities,
    a paraphrase probability, or an STS score (see the module docstring). With `fold` (k, n),
    for the examples of fold k alone: the other rows are NaN, "no target from this teacher"."""
    model.eval()
    classes = (model.heads[data.task].out_features,) if data.task in ("sst", "cfimdb") else ()
    targets = torch.full((len(data), *classes), torch.nan)
    taught = None if fold is None else [i for i, e in enumerate(data.examples) if tasks.fold_of(e.id, fold[1]) == fold[0]]
    for indices in data.ordered_batches(batch_size, taught):
        batch = data.batch(indices)  # on the device the data is held on
        with autocast():
            outputs = model(data.task, batch["inputs"]).float()
        if data.task == "sts":
            outputs = losses.STS_MAX_SCORE * outputs  # the score the STS loss compares with the gold one
        elif data.task == "para":
            outputs = outputs.sigmoid()
        else:
            outputs = outputs.softmax(dim=-1)
        targets[indices] = outputs.cpu()
    return targets


def ensemble(per_teacher, data):
    """Liu et al.'s ensemble: the mean of the teachers' targets (probabilities, or STS scores),
    each example's over the teachers that teach it; TeacherError if none does."""
    mean = torch.stack(per_teacher).nanmean(0)
    untaught = [e.id for e, row in zip(data.examples, mean) if row.isnan().any()]
    if untaught:
        raise TeacherError(f"--teachers give no {data.task} target for example {untaught[0]!r} (and "
                           f"{len(untaught) - 1} more): give a --fold teacher for every fold")
    return mean


def targets_by_id(targets, data):
    return {example.id: target for example, target in zip(data.examples, targets)}


def aligned(by_id, data, source):
    """{example id: target} -> one row per example of `data`, in its order; TeacherError if the
    cache lacks one of its examples (it was made for other training data)."""
    missing = [e.id for e in data.examples if e.id not in by_id]
    if missing:
        raise TeacherError(f"{source}: no {data.task} teacher target for example id {missing[0]!r} "
                           f"(and {len(missing) - 1} more): it was made for other training data")
    return torch.stack([by_id[e.id] for e in data.examples])


# ----------------------------------------------------------------------------- the mix

def gold_share(anneal, weight, done):
    """λ, the gold label's share of the target, when the fraction `done` of the run is done:
    annealed, λ = done (0 at the first step, 1 at the end); fixed, λ = 1 - weight."""
    return done if anneal == "linear" else 1.0 - weight


def mixed_target(task, labels, teacher, gold):
    """λ · gold + (1 - λ) · teacher, gold one-hot for the classification tasks."""
    if task in ("sst", "cfimdb"):
        labels = torch.nn.functional.one_hot(labels, teacher.shape[-1]).to(teacher.dtype)
    return gold * labels.to(teacher.dtype) + (1 - gold) * teacher
