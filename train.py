"""Fine-tune one shared BERT encoder on SST, PARA and STS at once (or on any one task).

The main job, on the default checkpoint (all-MiniLM-L6-v2) and the shared data:

    python train.py --option finetune --loss gls --sampler roundrobin --data_dir ../shared/data

and a smoke run (7 steps a task, at the default batch of 32):

    python train.py --limit 200 --epochs 1 --eval_limit 200 --data_dir ../shared/data

One training step (`training_step`), on the batches B_t the sampler names for the step's tasks t:

    L_t = loss of head t on B_t          cross-entropy (SST, CFIMDB), binary cross-entropy (PARA),
                                         squared error of 5·cos against the 0-5 score (STS); losses.py;
                                         with --teachers against λ·gold + (1 - λ)·teacher, λ the gold
                                         share (distill.gold_share), less H of that target (KL); distill.py
    L   = sum_t L_t  |  GLS  |  FLS      the loss strategy, the study's eqs. 1, 7, 8; losses.py
    L  += sum_t (λ_s R_s,t + μ D_Breg,t) with --smart: SMART's two regularisers; smart.py
    g   = ∇_θ L,  g ← g·min(1, c/‖g‖)    one backward pass; with --clip_grad c, global-norm clipping
    θ   ← AdamW or AdaBelief(θ, g, η)    at the rate η(done), done the fraction of the run done; optim.py
    θ̃   ← β θ̃ + (1 - β) θ                with --smart: SMART's teacher follows the weights; smart.py

The loop (`train`): for every epoch, the sampler's plan for it (samplers.py, rebuilt from
(seed, epoch)), one step per entry, then a dev evaluation. Files in --out_dir (runs/<name from the
flags> by default): args.json, metrics.jsonl, best.pt, last.pt, and at the end predictions/ (the
CS224N leaderboard files of the best model) and scores.json, its dev scores, written last. Every
file is written atomically, and `--resume` continues a stopped run from its last.pt to the same
weights, bit for bit on the same CPU, as a run never stopped: checkpoints.py says how.

Errors. Input a user can get wrong (a flag, a data file, a checkpoint, an --out_dir that holds
a run already) is checked before anything is written, and stops the run with one `error:` line
and exit status 2. A NaN or inf loss or gradient skips the step (metrics.jsonl's skipped_steps,
a running total); MAX_BAD_STEPS_IN_A_ROW such steps stop the run. No command overwrites what
another wrote.

Under torchrun, N processes train one model together: see distributed.py.
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import distill
import distributed
import losses
import optim
import samplers
import tasks
from bert import BertConfig, BertModel, CheckpointError, default_checkpoint_path
from distributed import all_reduce_gradients, global_means, shard
from tokenizer import BertTokenizer

MAX_BAD_STEPS_IN_A_ROW = 20  # non-finite steps skipped in a row before the run is stopped
# Flags that say where a run reads and writes and how fast it runs, not what it learns: a resumed
# run may give them anew (--bert: the same checkpoint, moved). Every other flag comes from last.pt.
# --epochs may change too, but only under --lr_schedule constant and --warmup 0, where the number
# of epochs changes no step's rate (flags_of_the_run checks it).
# A finished run so extended replaces its predictions and scores.json at its new end.
FREE_ON_RESUME = {"out_dir", "data_dir", "bert", "device", "save_every", "eval_batch_size", "compile",
                  "fused_optimizer", "resume"}


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line a user can act on."""


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    try:
        device = distributed.start(pick_device(args.device))
    except RuntimeError as e:  # a bad launch: the message says what to change
        raise RunError(one_line(e)) from None
    if args.precision == "bf16" and native_precision(device) == "fp32":  # asked for, so kept, but said
        log("--precision bf16 here is emulated (no native bfloat16 matmul on this device): fp32, what "
            "--precision auto picks here, runs many times faster")
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)

    # Everything a user can get wrong is checked, and all input read, before out_dir is touched.
    checkpoint_dir = Path(args.bert) if args.bert else default_checkpoint_path()
    tokenizer = load_tokenizer(checkpoint_dir)
    check_checkpoint_fits(args, tokenizer, checkpoint_dir)
    check_out_dir(args, out_dir)
    dev_data = {t: load_split(args, tokenizer, t, "dev", args.eval_limit, device) for t in args.tasks}
    test_data = {t: load_split(args, tokenizer, t, "test-student", args.eval_limit, device) for t in args.tasks}
    train_data = {} if args.eval_only else {t: load_split(args, tokenizer, t, "train", args.limit, device)
                                            for t in args.tasks}
    teachers = {} if args.eval_only or not args.teachers else teacher_targets(args, checkpoint_dir, train_data, device)
    # the same seed: the same weights on every rank (drawn after the teachers' heads, with --teachers)
    model = build_model(args, checkpoint_dir, device)
    if distributed.RANK > 0:  # but each rank its own dropout masks (and SMART noise)
        torch.manual_seed(args.seed + distributed.RANK)

    best_saved = {}  # best.pt's contents, once a run has trained
    if args.eval_only:
        if args.checkpoint:  # without one, the released encoder is scored as it is
            model.load_state_dict(checkpoints.load_model_state(args.checkpoint, model))
    else:
        optimizer, regulariser = build_optimizer(args, model), build_regulariser(args, model)
        progress = (checkpoints.resume(out_dir / "last.pt", model, optimizer, regulariser, device) if args.resume
                    else new_progress())
        distributed.barrier()  # every rank has read last.pt before rank 0 writes there
        if distributed.RANK == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.write_atomically(out_dir / "args.json", json.dumps(vars(args), indent=2))
            if args.resume:  # killed between last.pt and metrics.jsonl, a run left the latter an epoch short
                checkpoints.write_metrics(out_dir, progress["history"])
            elif teachers:  # what a resumed run reads back, so that it mixes the same targets
                targets = {task: distill.targets_by_id(t, train_data[task]) for task, t in teachers.items()}
                checkpoints.save_atomically(targets, out_dir / "teachers.pt")
        if args.resume:
            log(f"resuming from {out_dir / 'last.pt'}: epoch {progress['epoch'] + 1}, step {progress['step']}")
        else:  # so that a run stopped at any moment from here on can be resumed
            checkpoints.save_resumable(out_dir / "last.pt", args, model, optimizer, regulariser, progress, device)
        train(args, model, optimizer, regulariser, progress, train_data, dev_data, device, out_dir, teachers)
        distributed.barrier()  # rank 0 has written best.pt
        best_saved = checkpoints.load_checkpoint(out_dir / "best.pt")
        model.load_state_dict(checkpoints.checked_model_state(out_dir / "best.pt", best_saved, model))

    if "dev_predictions" in best_saved:  # what the best epoch's evaluation found: the same weights predict
        # the same again (with --eval_only, or a best.pt older than this, dev is predicted here)
        scores, dev_predicted = best_saved["dev"], best_saved["dev_predictions"]
        overall = tasks.overall_score(scores)
    else:
        scores, overall, dev_predicted = evaluate(model, dev_data, args, device)
    for task in args.tasks:
        write_predictions(out_dir / "predictions" / f"{task}-dev-output.csv", dev_data[task], dev_predicted[task])
        write_predictions(out_dir / "predictions" / f"{task}-test-output.csv", test_data[task],
                          predict(model, test_data[task], args, device))
    print_table("best model, dev:", [*scores.items(), ("overall", overall)])
    if distributed.RANK == 0:  # written last, so it marks a finished run (results/table.py reads it)
        summary = {"dev": scores, "overall": overall, "seconds": round(time.time() - started, 1)}
        if not args.eval_only:  # what a student checks before it learns from this run (distill.py)
            summary["fingerprint"] = distill.fingerprint(checkpoint_dir, args.data_dir, args.tasks)
        checkpoints.write_atomically(out_dir / "scores.json", json.dumps(summary) + "\n")
    log(f"predictions written to {out_dir / 'predictions'}")
    return scores


def training_step(args, model, optimizer, regulariser, params, batches, shares, device, gold_share=1.0):
    """One optimizer step on the step's task batches (see the module docstring). Returns the loss,
    or None when the loss or a gradient is NaN or inf: then the weights stay as they were.
    `shares` is each batch's share of its global batch under torchrun (1.0 in one process); a
    batch with a "teacher" target is distilled, `gold_share` being the gold label's share (distill.py)."""
    zero_gradients(optimizer, model.encoder.word_table)
    with autocast(args, device):
        # the task losses in float32 whatever the autocast: GLS and FLS take their logs
        task_losses = global_means({task: task_loss(task, model(task, b["inputs"]), b["labels"], b.get("teacher"),
                                                    gold_share, args.distill_loss).float()
                                    for task, b in batches.items()}, shares)
        loss = losses.combine_losses(task_losses, args.loss, args.focus)
        if regulariser is not None:
            loss = loss + smart_term(regulariser, batches, shares)
    if not torch.isfinite(loss):  # the same global loss on every rank: they all skip together
        return None
    loss.backward()
    all_reduce_gradients(params)
    try:  # with clipping off, an infinite max_norm still checks that the norm is finite
        optim.clip_grad_norm(params, args.clip_grad if args.clip_grad > 0 else math.inf)
    except optim.NonFiniteGradientError:
        return None
    optimizer.step()
    if regulariser is not None:
        regulariser.update_teacher()
    return loss.item()


def zero_gradients(optimizer, word_table):
    """Set every gradient to None, so that a head with no batch this step gets no update (AdamW
    would move it by its momentum and weight decay on a zero gradient); but keep the word table's,
    zeroed: its lookup then adds the batch's rows into it instead of allocating 45 MiB a step
    (bert.word_embeddings)."""
    kept = word_table.grad
    optimizer.zero_grad(set_to_none=True)
    if word_table.requires_grad:
        dense = kept is not None and kept.layout == torch.strided
        word_table.grad = kept.zero_() if dense else torch.zeros_like(word_table)


def task_loss(task, outputs, labels, teacher=None, gold_share=1.0, kind="kl"):
    """The task's loss against its gold labels or, with a teacher's targets, against their mix
    λ·gold + (1 - λ)·teacher (λ = `gold_share`); for the classification tasks with kind
    "kl" less the mixed target's entropy, so that it falls to 0 as the plain loss does (losses.py)."""
    if teacher is not None and gold_share < 1:  # in float32, bf16 logits too: the KL is a small difference
        outputs, labels = outputs.float(), distill.mixed_target(task, labels, teacher, gold_share)
    else:  # no teacher for this task, or λ = 1: the plain loss, exactly
        teacher = None
    if task == "sts":
        return losses.similarity_mse_loss(outputs, labels)
    if teacher is None:
        return losses.binary_cross_entropy_loss(outputs, labels) if task == "para" else \
            losses.cross_entropy_loss(outputs, labels)
    if task == "para":
        loss = losses.soft_binary_cross_entropy_loss(outputs, labels)
    else:
        loss = losses.soft_cross_entropy_loss(outputs, labels)
    return loss - losses.target_entropy(labels, binary=task == "para") if kind == "kl" else loss


def smart_term(regulariser, batches, shares):
    """The sum over the step's tasks of λ_s R_s + μ D_Breg, each a batch mean; under torchrun
    each task's term is made its global batch's mean first, as the task losses are."""
    if distributed.WORLD_SIZE == 1:
        return regulariser(batches)
    return sum(global_means({task: regulariser({task: b}) for task, b in batches.items()}, shares).values())


def learning_rate(args, done):
    """The rate of a step taken when the fraction `done` of the run is done (0 at the first step):
    with --warmup W it rises linearly from 0 to --lr over the first fraction W; then it stays at
    --lr (constant), or falls linearly to 0 at the end (linear), BERT's recipe (Devlin et al.
    2019). A function of (epoch, step) alone, so a resumed run steps at the same rates."""
    if done < args.warmup:
        return args.lr * done / args.warmup
    if args.lr_schedule == "linear":
        return args.lr * (1 - done) / (1 - args.warmup)
    return args.lr


def train(args, model, optimizer, regulariser, progress, train_data, dev_data, device, out_dir, teachers):
    """Train from `progress` (new_progress(), or what checkpoints.resume returned) to the end of
    the last epoch. Every rank runs this loop over the same plan; rank 0 alone writes files."""
    params = [p for p in model.parameters() if p.requires_grad]
    # one target row per training example, in train_data's order: a batch's "rows" index them
    teachers = {task: targets.to(device) for task, targets in teachers.items()}
    save_last = lambda: checkpoints.save_resumable(out_dir / "last.pt", args, model, optimizer, regulariser,
                                                   progress, device)
    for epoch in range(progress["epoch"], args.epochs):
        plan = epoch_plan(args, train_data, epoch)
        model.train()
        started = time.time()
        bar = tqdm(range(progress["step"], len(plan)), desc=f"epoch {epoch + 1}/{args.epochs}", total=len(plan),
                   initial=progress["step"], dynamic_ncols=True, file=sys.stderr, disable=distributed.RANK != 0)
        for step in bar:
            done = (epoch + step / len(plan)) / args.epochs
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, done)
            batches, shares = {}, {}
            for task, indices in plan[step].items():
                mine, shares[task] = shard(indices)
                batches[task] = train_data[task].batch(mine)
                if task in teachers:
                    batches[task]["teacher"] = teachers[task][batches[task]["rows"]]
            gold_share = distill.gold_share(args.distill_anneal, args.distill_weight, done)
            loss = training_step(args, model, optimizer, regulariser, params, batches, shares, device, gold_share)
            progress["step"] = step + 1
            if loss is None:
                count_bad_step(progress, epoch, step)
                continue
            progress["bad_in_a_row"] = 0
            progress["total_loss"] += loss
            progress["n_steps"] += 1
            bar.set_postfix(loss=f"{progress['total_loss'] / progress['n_steps']:.4f}")
            # (the epoch's last step is followed by the end-of-epoch save anyway)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(plan):
                save_last()
        bar.close()
        end_epoch(args, model, progress, epoch, started, dev_data, device, out_dir)
        save_last()
        if distributed.RANK == 0:
            checkpoints.write_metrics(out_dir, progress["history"])


def count_bad_step(progress, epoch, step):
    progress["skipped"] += 1
    progress["bad_in_a_row"] += 1
    log(f"epoch {epoch + 1}, step {step}: non-finite loss or gradient, step skipped ({progress['skipped']} so far)")
    if progress["bad_in_a_row"] >= MAX_BAD_STEPS_IN_A_ROW:
        raise RunError(f"{progress['bad_in_a_row']} non-finite steps in a row (epoch {epoch + 1}, step {step}): "
                       "lower --lr or set --clip_grad")


def end_epoch(args, model, progress, epoch, started, dev_data, device, out_dir):
    """Evaluate on dev, record the epoch in `progress`, and save best.pt if it is the best yet.
    The recorded train_loss is the loss optimised, SMART's term included: compare it only between
    runs of the same --loss and --smart."""
    scores, overall, predicted = evaluate(model, dev_data, args, device)
    record = {"epoch": epoch + 1, "train_loss": progress["total_loss"] / max(progress["n_steps"], 1),
              "dev": scores, "overall": overall, "seconds": round(time.time() - started, 1),
              "skipped_steps": progress["skipped"]}
    print_table(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, dev:", [*scores.items(), ("overall", overall)])
    progress.update(epoch=epoch + 1, step=0, total_loss=0.0, n_steps=0)
    progress["history"].append(record)
    score = overall if math.isfinite(overall) else -math.inf  # NaN outputs rank lowest
    # the first epoch is always saved, so that a finished run has a best.pt to end with
    if progress["best_epoch"] == 0 or score > progress["best"]:
        progress["best"], progress["best_epoch"] = score, epoch + 1
        if distributed.RANK == 0:
            best = {"model": model.state_dict(), "epoch": epoch + 1, "dev": scores, "dev_predictions": predicted}
            checkpoints.save_atomically(best, out_dir / "best.pt")


def new_progress():
    """Where a run stands. Saved in last.pt, so that a resumed run goes on exactly where it stopped."""
    return {"epoch": 0, "step": 0,               # epochs finished; steps of the current epoch done
            "total_loss": 0.0, "n_steps": 0,     # the current epoch's training loss so far
            "skipped": 0, "bad_in_a_row": 0,     # non-finite steps: all of them, and in a row now
            "best": -math.inf, "best_epoch": 0,  # best overall dev score so far, and its epoch
            "history": []}                       # the records of metrics.jsonl, one per epoch


# ----------------------------------------------------------------------------- evaluation and output

@torch.no_grad()
def predict(model, data, args, device):
    """The head's predictions for every example of `data`, in file order. Under torchrun each rank
    predicts every WORLD_SIZE-th batch, and every rank gets all the predictions."""
    model.eval()
    predicted = {}
    for indices in data.ordered_batches(args.eval_batch_size)[distributed.RANK::distributed.WORLD_SIZE]:
        batch = data.batch(indices)
        with autocast(args, device):
            outputs = model(data.task, batch["inputs"])
        predicted.update(zip(indices, tasks.predictions_from_outputs(data.task, outputs.float()).tolist()))
    predicted = {i: value for part in distributed.gathered(predicted) for i, value in part.items()}
    return [predicted[i] for i in range(len(data))]


def evaluate(model, dev_data, args, device):
    """Dev scores per task, the overall score, and the predictions they were computed from."""
    predicted = {task: predict(model, data, args, device) for task, data in dev_data.items()}
    scores = {task: tasks.task_score(task, predicted[task], data.labels) for task, data in dev_data.items()}
    return scores, tasks.overall_score(scores), predicted


def write_predictions(path, data, predicted):
    """One CS224N leaderboard file: `id \\t Column ` header, then `id , prediction ` rows (rank 0 writes)."""
    if distributed.RANK != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{e.id} , {value:.4f} \n" if data.task == "sts" else f"{e.id} , {value} \n"
            for e, value in zip(data.examples, predicted)]
    checkpoints.write_atomically(path, f"id \t {tasks.PREDICTION_COLUMNS[data.task]} \n" + "".join(rows))


def print_table(title, rows):
    if distributed.RANK == 0:
        print(title + "".join(f"\n  {name:<10} {value:.4f}" for name, value in rows))


def log(message):
    """A line on stdout that leaves the progress bar intact; rank 0 alone speaks."""
    if distributed.RANK == 0:
        tqdm.write(message)


# ----------------------------------------------------------------------------- set-up: data, model, optimizer

def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def autocast(args, device):
    """bfloat16 autocast with --precision bf16, a no-op context with fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def native_precision(device):
    """bf16 where the hardware multiplies bfloat16 natively, else fp32. Under bf16 autocast the
    matmuls run in bfloat16 (float32 accumulation) while weights, optimizer and the residual
    stream stay float32; the main command scores as it did in float32 (results/README.md, "Precision")."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if device.type == "cpu" and native else "fp32"


def load_tokenizer(checkpoint_dir):
    """The checkpoint folder's vocab.txt as a tokenizer, or CheckpointError."""
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: checkpoint folder not found (--bert names a Hugging Face BERT folder)")
    vocab_file = checkpoint_dir / "vocab.txt"
    if not vocab_file.is_file():
        raise CheckpointError(f"{vocab_file}: not found (a BERT checkpoint folder holds vocab.txt beside config.json)")
    try:
        return BertTokenizer.from_pretrained(vocab_file)
    except ValueError as e:  # no special tokens, or not UTF-8
        raise CheckpointError(f"{vocab_file}: {e}") from None


def check_checkpoint_fits(args, tokenizer, checkpoint_dir):
    """What config.json says must fit the vocab and the flags; checked before the weights are read."""
    config = BertConfig.from_json(checkpoint_dir / "config.json")
    n_ids = max(tokenizer.vocab.values()) + 1
    if n_ids > config.vocab_size:
        raise CheckpointError(f"{checkpoint_dir / 'vocab.txt'} has {n_ids} tokens but config.json only "
                              f"{config.vocab_size} embeddings: the vocab belongs to another checkpoint")
    if args.max_length > config.max_position_embeddings:
        raise RunError(f"--max_length {args.max_length} exceeds the checkpoint's "
                       f"{config.max_position_embeddings} position embeddings")
    if "para" in args.tasks and config.type_vocab_size < 2:
        raise RunError(f"{checkpoint_dir}: one token type only, but para encodes sentence pairs (types 0 and 1)")


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "scores.json", "predictions")


def check_out_dir(args, out_dir):
    """Nothing a user has is overwritten: a new run, or an evaluation, needs an --out_dir that
    holds none of a run's files (--resume is checked in flags_of_the_run)."""
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held and not args.resume:
        hint = "choose another --out_dir" if args.eval_only else "add --resume to continue it, or choose another --out_dir"
        raise RunError(f"{out_dir} already holds a run ({held[0]}): {hint}")


def load_split(args, tokenizer, task, split, limit, device):
    examples = tasks.read_examples(args.data_dir, task, split, report=log)
    if split == "train" and args.fold:  # a teacher to be, trained without the fold it will teach
        k, n = parse_fold(args.fold)
        examples = [e for e in examples if tasks.fold_of(e.id, n) != k]
    if limit is not None and limit < len(examples) and split == "train":
        # a seeded sample, not the first rows: the SST file, for one, lists positive reviews first
        keep = sorted(random.Random(args.seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    elif limit is not None:
        examples = examples[:limit]  # dev/test: the first rows, so outputs line up with the files
    # compiled on CUDA: a few fixed shapes, so that CUDA graphs are recorded once per shape, not per length
    pad_multiple = 16 if args.compile and device.type == "cuda" else 1
    return tasks.TaskData(task, examples, tokenizer, args.max_length, pad_multiple, device)


def build_model(args, checkpoint_dir, device):
    encoder = BertModel.from_pretrained(checkpoint_dir, hidden_dropout_prob=args.hidden_dropout_prob)
    model = tasks.MultitaskBert(encoder, args.tasks, args.hidden_dropout_prob, args.pooling)
    if args.option == "pretrain":
        for param in model.encoder.parameters():
            param.requires_grad_(False)
    model.to(device)
    if args.compile:  # compiled in place: state_dict names, and so checkpoints, stay the same
        if device.type == "cuda":  # CUDA graphs, one per padded shape (load_split): no kernel launches to wait on
            model.encoder.compile(mode="reduce-overhead", dynamic=False)
        else:  # one graph for every length
            model.encoder.compile(dynamic=True)
    return model


def teacher_targets(args, checkpoint_dir, train_data, device):
    """{task: one target per training example} from --teachers (distill.py): read back from the
    run's teachers.pt when resuming, else predicted by each teacher and averaged per task."""
    cache = Path(args.out_dir) / "teachers.pt"
    if args.resume and cache.is_file():
        saved = checkpoints.load_checkpoint(cache)
        return {task: distill.aligned(saved[task], train_data[task], cache) for task in saved}
    fingerprint = distill.fingerprint(checkpoint_dir, args.data_dir, args.tasks)
    per_task = {}
    for folder in args.teachers:
        teacher_args = distill.read_teacher(folder, args.tasks, fingerprint)
        encoder = BertModel.from_pretrained(checkpoint_dir)
        teacher = tasks.MultitaskBert(encoder, teacher_args["tasks"], 0.0, teacher_args["pooling"]).to(device)
        teacher.load_state_dict(checkpoints.load_model_state(Path(folder) / "best.pt", teacher))
        log(f"teacher {folder}: predicting {', '.join(teacher_args['tasks'])} on the training examples")
        fold = parse_fold(teacher_args.get("fold"))  # a --fold teacher teaches its fold alone
        for task in teacher_args["tasks"]:
            per_task.setdefault(task, []).append(
                distill.soft_targets(teacher, train_data[task], args.eval_batch_size,
                                    lambda: autocast(args, device), fold))
    return {task: distill.ensemble(targets, train_data[task]) for task, targets in per_task.items()}


def build_optimizer(args, model):
    """AdamW or AdaBelief over every trainable parameter, in one group: weight decay applies to
    LayerNorm weights and biases too (BERT's and nanoGPT's recipes exempt them), see optim.py."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:  # pretrain (encoder frozen) with only weightless heads, STS's being a cosine
        raise RunError(f"--option {args.option} --tasks {','.join(args.tasks)} has nothing to train: the encoder "
                       "is frozen and these heads have no weights (score the checkpoint as it is with --eval_only)")
    kind = optim.AdamW if args.optimizer == "adamw" else optim.AdaBelief
    fused = args.fused_optimizer is not False  # "auto" (not given): fused where torch.compile builds it
    try:
        optimizer = kind(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    except ValueError as e:  # optim.py says which value is out of range
        raise RunError(f"--optimizer {args.optimizer}: {e}") from None
    if fused:
        try:
            optim.compile_fused_update(optimizer)
        except Exception as error:  # whatever the compiler stack raises, the remedy is the same
            reason = f"torch.compile could not build the update ({type(error).__name__}: {one_line(error)})"
            if args.fused_optimizer is True:
                raise RunError(f"--fused_optimizer: {reason}; run with --no-fused_optimizer") from None
            log(f"the optimizer runs its eager update: {reason}")
            optimizer.fused = False
    return optimizer


def build_regulariser(args, model):
    if not args.smart:
        return None
    import smart
    try:
        return smart.SmartRegulariser(model, lambda_s=args.smart_lambda, eps=args.smart_eps, sigma=args.smart_sigma,
                                      step_size=args.smart_step, n_steps=args.smart_steps, mu=args.bregman_mu,
                                      beta=args.bregman_beta)
    except ValueError as e:  # smart.py says which value is out of range
        raise RunError(f"--smart: {e}") from None


def epoch_plan(args, train_data, epoch):
    """The epoch's steps, rebuilt identically from (seed, epoch): resuming needs no sampler state."""
    rng = random.Random(args.seed * 1000 + epoch)  # distinct for every (seed, epoch) while epochs < 1000
    # lengths=...: bind each task's lengths now, not the loop variable's last value
    task_batches = {task: (lambda r, lengths=data.lengths: samplers.length_bucketed_batches(lengths, args.batch_size, r))
                    for task, data in train_data.items()}
    return samplers.make_plan(args.sampler, task_batches, rng, alpha=args.alpha)


# ----------------------------------------------------------------------------- flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not the whole usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (python train.py --help lists the flags)\n")


def number(text):
    """A float flag's type: a finite number (nan and inf are refused with the flag's name)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       allow_abbrev=False)  # a flag is named in full: --resume compares flags by name
    g = p.add_argument_group("what to train")
    g.add_argument("--option", choices=["pretrain", "finetune"], default="finetune",
                   help="pretrain (CS224N's name; not BERT's pre-training): freeze the encoder, train only the "
                   "heads, a linear probe; finetune: train everything")
    g.add_argument("--tasks", default="sst,para,sts", help="comma list of sst,para,sts,cfimdb; one task = single-task")
    g.add_argument("--loss", choices=["sum", "gls", "fls"], default="sum", help="how the step's task losses combine: "
                   "sum; gls, their geometric mean; fls, GLS times the geometric mean of the --focus tasks' (losses.py)")
    g.add_argument("--focus", default="para", help="comma list of focused tasks for --loss fls")
    g.add_argument("--sampler", choices=samplers.SAMPLERS, default="sequential",
                   help="which task batches form a step. sequential: all of one task's, then the next's; break: "
                   "one batch of every task a step, until the smallest runs out; roundrobin: the same, the smaller "
                   "tasks restarting until the largest has run once; proportional: one task a step, drawn by size")
    g.add_argument("--alpha", type=number, default=1.0, help="proportional sampler: P(task) ~ n_task^alpha")
    g.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                   help="sentence vector the classification heads read: mean of the tokens, or BERT's [CLS] pooler")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adamw", "adabelief"], default="adamw",
                   help="adabelief runs with RAdam's rectification, as adabelief-pytorch's defaults do")
    g.add_argument("--lr", type=number, default=None, help="peak learning rate; None: 1e-3 for pretrain, 1e-4 for finetune")
    g.add_argument("--lr_schedule", choices=["constant", "linear"], default="linear",
                   help="linear: after --warmup the rate falls in a straight line from --lr to 0 at the end; constant: "
                   "--lr throughout (the study's)")
    g.add_argument("--warmup", type=number, default=0.0,
                   help="fraction of the run over which the rate first rises from 0 to --lr (0 = none)")
    g.add_argument("--weight_decay", type=number, default=0.01, help="decoupled weight decay, on every parameter")
    g.add_argument("--clip_grad", type=number, default=0.0, help="max global gradient L2 norm (0 = off)")
    g.add_argument("--hidden_dropout_prob", type=number, default=0.1, help="dropout of the encoder's hidden "
                   "states and before the heads (the attention probabilities keep the checkpoint's, 0.1)")
    g.add_argument("--batch_size", type=int, default=32, help="examples per task per step (the global batch under "
                   "torchrun, split across the ranks)")
    g.add_argument("--epochs", type=int, default=3, help="epochs of the sampler's plan; how much of each task one covers "
                   "depends on --sampler (samplers.py)")
    g.add_argument("--seed", type=int, default=11711, help="fixes the heads' initial weights, the batches, dropout "
                   "and the --limit sample")
    g.add_argument("--max_length", type=int, default=128, help="tokens per sequence (para's pair: both questions together; "
                   "sts: each sentence)")
    g.add_argument("--fused_optimizer", action=argparse.BooleanOptionalAction, default="auto",
                   help="the optimizer's per-tensor update compiled by torch.compile (3x faster here; needs a C++ "
                   "compiler); auto: compiled where it builds, else eager")
    g = p.add_argument_group("SMART (Jiang et al., 2020)")
    g.add_argument("--smart", action="store_true", help="add the adversarial and Bregman regularisers")
    g.add_argument("--smart_lambda", type=number, default=1.0, help="weight lambda_s of the adversarial term")
    g.add_argument("--smart_eps", type=number, default=1e-5, help="radius of the perturbation ball (inf-norm)")
    g.add_argument("--smart_sigma", type=number, default=1e-5, help="std of the initial noise")
    g.add_argument("--smart_step", type=number, default=1e-3, help="ascent step size eta")
    g.add_argument("--smart_steps", type=int, default=1, help="ascent steps K")
    g.add_argument("--bregman_mu", type=number, default=1.0, help="weight mu of the Bregman proximal term")
    g.add_argument("--bregman_beta", type=number, default=0.99, help="teacher momentum beta")
    g = p.add_argument_group("distillation (Clark et al., 2019; Liu et al., 2019)")
    g.add_argument("--teachers", default=None, help="comma list of finished train.py run folders whose models teach "
                   "their tasks; two or more of one task are averaged")
    g.add_argument("--distill_anneal", choices=["linear", "none"], default="linear",
                   help="linear: the gold share of each target rises from 0 to 1 over the run (teacher annealing); "
                   "none: it stays 1 - --distill_weight")
    g.add_argument("--distill_weight", type=number, default=0.5, help="the teachers' share with --distill_anneal none")
    g.add_argument("--fold", default=None, metavar="K/N", help="train without fold K of N of each training file "
                   "(folds by example id), to teach that fold out of sample as a teacher (0 <= K < N)")
    g.add_argument("--distill_loss", choices=["kl", "ce"], default="kl",
                   help="classification tasks against the mixed target: KL divergence, or cross-entropy (KL + the "
                   "target's entropy)")
    g = p.add_argument_group("data, checkpoints, devices")
    g.add_argument("--data_dir", default="data", help="folder with the CS224N task files")
    g.add_argument("--bert", default=None, help="BERT checkpoint folder (default: the installed all-MiniLM-L6-v2)")
    g.add_argument("--out_dir", default=None, help="where the run's files go (default runs/<name from the flags>; with "
                   "--eval_only, eval-<checkpoint name> beside --checkpoint, or runs/eval-<tasks>-released)")
    g.add_argument("--limit", type=int, default=None, help="at most N training examples per task, a seeded sample "
                   "(quick runs)")
    g.add_argument("--eval_limit", type=int, default=None, help="at most N dev/test examples per task, the first N "
                   "(quick runs)")
    g.add_argument("--eval_batch_size", type=int, default=64, help="examples per batch when predicting")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda where there is one")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16: bfloat16 autocast for the matmuls (the losses stay float32); auto: bf16 where the "
                   "hardware has it (CPUs with AVX512-BF16 or AMX, CUDA cards with bf16), else fp32 (bf16 elsewhere "
                   "is emulated, many times slower)")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder (measured slower on CPU); on "
                   "CUDA as CUDA graphs, with lengths padded to multiples of 16 (untried on a GPU yet)")
    g.add_argument("--save_every", type=int, default=0, help="also save last.pt every N steps of an epoch")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its last.pt, with its "
                   "flags (give --out_dir, or the run's flags, which name its default folder)")
    g.add_argument("--eval_only", action="store_true", help="score --checkpoint (without it: the --bert checkpoint "
                   "as it is, heads untrained) and write predictions, into a folder of its own")
    g.add_argument("--checkpoint", default=None, help="model checkpoint (best.pt, last.pt) for --eval_only")
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.focus = [t.strip() for t in args.focus.split(",") if t.strip()]
    args.teachers = [t.strip() for t in args.teachers.split(",") if t.strip()] if args.teachers else []
    if args.lr is None:
        args.lr = 1e-3 if args.option == "pretrain" else 1e-4
    check_flags(p, args)
    if args.precision == "auto":  # saved resolved: a resumed run keeps the precision it began with
        args.precision = native_precision(pick_device(args.device))
    if args.out_dir is None:
        args.out_dir = str(default_out_dir(args))
    if args.resume:
        given = {token[2:].split("=")[0].removeprefix("no-") for token in argv if token.startswith("--")}
        args = flags_of_the_run(args, given, Path(args.out_dir) / "last.pt")
    return args


def check_flags(p, args):
    """The checks that turn a confusing failure later into one line now. (Values that smart.py
    and optim.py refuse with a clear message of their own are left to them.)"""
    unknown = [t for t in args.tasks + args.focus if t not in tasks.TASKS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}: choose from {', '.join(tasks.TASKS)}")
    if not args.tasks or len(set(args.tasks)) != len(args.tasks):
        p.error("--tasks must name each task once")
    if args.loss == "fls" and not args.focus:
        p.error("--loss fls needs at least one --focus task")
    if args.loss == "fls" and not set(args.focus) <= set(args.tasks):
        p.error(f"--focus {','.join(args.focus)} names a task not in --tasks {','.join(args.tasks)}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    for name in ("batch_size", "epochs", "eval_batch_size", "limit", "eval_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.max_length < 3:
        p.error("--max_length must be at least 3 (room for [CLS] and two [SEP]s)")
    if not (0 <= args.warmup < 1 and 0 <= args.hidden_dropout_prob < 1):
        p.error("--warmup and --hidden_dropout_prob must lie in [0, 1)")
    if args.clip_grad < 0 or args.save_every < 0:
        p.error("--clip_grad and --save_every cannot be negative")
    if args.checkpoint and not args.eval_only:
        p.error("--checkpoint is only read with --eval_only (to continue a run, use --resume)")
    if args.eval_only and args.resume:
        p.error("--eval_only and --resume exclude each other")
    if not 0 <= args.distill_weight <= 1:
        p.error("--distill_weight must lie in [0, 1]")
    if args.fold is not None and parse_fold(args.fold) is None:
        p.error(f"--fold {args.fold}: expected K/N with whole numbers 0 <= K < N and N >= 2, e.g. 0/5")


def parse_fold(text):
    """(k, n) of a --fold "k/n"; None for no fold, or a malformed one."""
    k, _, n = (text or "").partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n) and int(n) >= 2):
        return None
    return int(k), int(n)


def default_out_dir(args):
    """runs/<name from the flags>; an evaluation's own folder beside its checkpoint (or under runs/
    for the released encoder), so that it never writes into a run's folder."""
    if args.eval_only and args.checkpoint:
        return Path(args.checkpoint).parent / f"eval-{Path(args.checkpoint).stem}"
    if args.eval_only:
        return Path("runs") / f"eval-{'+'.join(args.tasks)}-released"
    name = f"{args.option}-{'+'.join(args.tasks)}-{args.loss}-{args.sampler}-{args.optimizer}-lr{args.lr:g}-b{args.batch_size}"
    for flag, value, off in (("", args.lr_schedule, "linear"), ("warmup", args.warmup, 0.0),
                             ("clip", args.clip_grad, 0.0), ("seed", args.seed, 11711)):
        if value != off:
            name += f"-{flag}{value:g}" if isinstance(value, float) else f"-{flag}{value}"
    if args.fold:
        name += "-fold{}of{}".format(*parse_fold(args.fold))
    return Path("runs") / (name + ("-smart" if args.smart else "") + ("-distill" if args.teachers else ""))


def flags_of_the_run(args, given, path):
    """--resume: the flags last.pt was saved with, but for FREE_ON_RESUME flags given anew. A
    given flag that would change what the run learns must have the run's own value."""
    if not path.is_file():
        raise RunError(f"--resume: {path} not found, nothing to resume (start without --resume)")
    state = checkpoints.load_checkpoint(path, mmap=True)
    if not (isinstance(state, dict) and isinstance(state.get("args"), dict) and vars(args).keys() <= state["args"].keys()
            and {"model", "optimizer", "progress", "ranks_rng"} <= state.keys()):
        raise RunError(f"{path}: not a resumable checkpoint of this train.py")
    saved, now = state["args"], vars(args)
    for name in sorted(given & (now.keys() - FREE_ON_RESUME - {"epochs"})):
        if now[name] != saved[name]:
            raise RunError(f"--resume: {path} was saved with --{name} {flag_text(saved[name])}, not "
                           f"{flag_text(now[name])}; resume with the run's own flags")
    epochs = now["epochs"] if "epochs" in given else saved["epochs"]
    if epochs != saved["epochs"] and (saved["lr_schedule"] != "constant" or saved["warmup"]):
        raise RunError(f"--resume: {path} was saved with --epochs {saved['epochs']}; under its --lr_schedule "
                       f"{saved['lr_schedule']} (and --warmup {saved['warmup']:g}) the epochs set every step's rate")
    if epochs < state["progress"]["epoch"]:
        raise RunError(f"--resume: {path} has {state['progress']['epoch']} epochs done, more than --epochs {epochs}")
    if state["progress"]["epoch"] >= epochs and (path.parent / "scores.json").exists():
        raise RunError(f"--resume: {path.parent} holds a finished run of {epochs} epochs, nothing to resume")
    return argparse.Namespace(**{**saved, **{name: now[name] for name in given & FREE_ON_RESUME},
                                 "epochs": epochs, "resume": True, "out_dir": now["out_dir"]})


def flag_text(value):
    return ",".join(value) if isinstance(value, list) else str(value)


def one_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def cli():
    try:
        main()
    except (tasks.DataError, CheckpointError, RunError, distill.TeacherError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: a training run continues from its last checkpoint with the same command "
              "plus --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
