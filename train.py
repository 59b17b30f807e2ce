"""Fine-tune one shared BERT encoder on SST, PARA and STS at once (or on any one task).

The main job, on the default checkpoint (all-MiniLM-L6-v2) and the shared data:

    python train.py --option finetune --loss gls --sampler roundrobin --data_dir ../shared/data

A quick smoke run (a few dozen steps per task):

    python train.py --limit 200 --epochs 1 --eval_limit 200 --data_dir ../shared/data

One training step: the sampler (samplers.py) names a batch for one or more tasks; each batch
goes through the shared encoder and its task's head (tasks.py); the task losses are combined by
the chosen strategy (losses.py: sum, GLS, FLS), optionally with SMART's regularisers (smart.py);
then one backward pass, optional global-norm clipping and one optimizer step (optim.py).
Every epoch evaluates on the dev sets, appends to <out_dir>/metrics.jsonl, keeps the best model
by overall dev score and a resumable checkpoint; the end writes CS224N leaderboard files.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import losses
import optim
import samplers
import tasks
from bert import BertModel, CheckpointError, default_checkpoint_path
from tokenizer import BertTokenizer

MAX_BAD_STEPS_IN_A_ROW = 20  # non-finite steps skipped in a row before the run is stopped


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line a user can act on."""


# ----------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--option", choices=["pretrain", "finetune"], default="finetune",
                   help="pretrain: freeze the encoder, train only the heads; finetune: train everything")
    g.add_argument("--tasks", default="sst,para,sts", help="comma list of sst,para,sts,cfimdb; one task = single-task")
    g.add_argument("--loss", choices=["sum", "gls", "fls"], default="sum", help="how task losses are combined")
    g.add_argument("--focus", default="para", help="comma list of focused tasks for --loss fls")
    g.add_argument("--sampler", choices=samplers.SAMPLERS, default="sequential", help="which task batches form a step")
    g.add_argument("--alpha", type=float, default=1.0, help="proportional sampler: P(task) ~ n_task^alpha")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adamw", "adabelief"], default="adamw")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 pretrain, 1e-5 finetune)")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--clip_grad", type=float, default=0.0, help="max global gradient L2 norm (0 = off)")
    g.add_argument("--hidden_dropout_prob", type=float, default=0.3, help="dropout in the encoder and heads")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--seed", type=int, default=11711)
    g.add_argument("--max_length", type=int, default=128, help="tokens per sequence (pairs: both together)")
    g = p.add_argument_group("SMART (Jiang et al., 2020)")
    g.add_argument("--smart", action="store_true", help="add the adversarial and Bregman regularisers")
    g.add_argument("--smart_lambda", type=float, default=1.0, help="weight lambda_s of the adversarial term")
    g.add_argument("--smart_eps", type=float, default=1e-5, help="radius of the perturbation ball (inf-norm)")
    g.add_argument("--smart_sigma", type=float, default=1e-5, help="std of the initial noise")
    g.add_argument("--smart_step", type=float, default=1e-3, help="ascent step size eta")
    g.add_argument("--smart_steps", type=int, default=1, help="ascent steps K")
    g.add_argument("--bregman_mu", type=float, default=1.0, help="weight mu of the Bregman proximal term")
    g.add_argument("--bregman_beta", type=float, default=0.99, help="teacher momentum beta")
    g = p.add_argument_group("data, checkpoints, devices")
    g.add_argument("--data_dir", default="data", help="folder with the CS224N task files")
    g.add_argument("--bert", default=None, help="BERT checkpoint folder (default: the installed all-MiniLM-L6-v2)")
    g.add_argument("--out_dir", default=None, help="where metrics, checkpoints and predictions go "
                                                   "(default runs/<name built from the flags>)")
    g.add_argument("--limit", type=int, default=None, help="at most N training examples per task (quick runs)")
    g.add_argument("--eval_limit", type=int, default=None, help="at most N dev/test examples per task (quick runs)")
    g.add_argument("--eval_batch_size", type=int, default=64)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    g.add_argument("--save_every", type=int, default=0, help="also save a resumable checkpoint every N steps")
    g.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    g.add_argument("--eval_only", action="store_true", help="evaluate --checkpoint and write predictions")
    g.add_argument("--checkpoint", default=None, help="model checkpoint for --eval_only")
    args = p.parse_args(argv)

    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.focus = [t.strip() for t in args.focus.split(",") if t.strip()]
    unknown = [t for t in args.tasks + args.focus if t not in tasks.TASKS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}: choose from {', '.join(tasks.TASKS)}")
    if not args.tasks:
        p.error("--tasks is empty")
    if len(set(args.tasks)) != len(args.tasks):
        p.error("--tasks names a task twice")
    if args.loss == "fls" and not set(args.focus) <= set(args.tasks):
        p.error(f"--focus {','.join(args.focus)} names a task not in --tasks {','.join(args.tasks)}")
    if args.lr is None:
        args.lr = 1e-3 if args.option == "pretrain" else 1e-5
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    for name in ("batch_size", "epochs", "max_length", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    for name in ("limit", "eval_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.max_length > 512:
        p.error("--max_length cannot exceed 512 (BERT's position embeddings)")
    if not 0 <= args.hidden_dropout_prob < 1:
        p.error("--hidden_dropout_prob must lie in [0, 1)")
    if args.weight_decay < 0 or args.clip_grad < 0 or args.save_every < 0:
        p.error("--weight_decay, --clip_grad and --save_every cannot be negative")
    if args.eval_only and not args.checkpoint:
        p.error("--eval_only needs --checkpoint PATH")
    if args.smart and not (args.smart_steps >= 0 and args.smart_eps > 0 and 0 <= args.bregman_beta < 1):
        p.error("SMART needs --smart_steps >= 0, --smart_eps > 0 and 0 <= --bregman_beta < 1")
    if args.out_dir is None:
        args.out_dir = str(Path("runs") / run_name(args))
    return args


def run_name(args):
    name = f"{args.option}-{'+'.join(args.tasks)}-{args.loss}-{args.sampler}-{args.optimizer}-lr{args.lr:g}"
    if args.clip_grad:
        name += f"-clip{args.clip_grad:g}"
    if args.smart:
        name += f"-smart{args.smart_lambda:g}"
    return name


# ----------------------------------------------------------------------------- building blocks

def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def load_split(args, tokenizer, task, split, limit, report):
    examples = tasks.read_examples(args.data_dir, task, split, report=report)
    if limit is not None:
        examples = examples[:limit]
    return tasks.TaskData(task, examples, tokenizer, args.max_length)


def build_model(args, checkpoint_dir, device):
    encoder = BertModel.from_pretrained(checkpoint_dir, hidden_dropout_prob=args.hidden_dropout_prob)
    model = tasks.MultitaskBert(encoder, args.tasks, args.hidden_dropout_prob)
    if args.option == "pretrain":
        for param in model.encoder.parameters():
            param.requires_grad_(False)
    model.to(device)
    if args.compile:
        model.encoder = torch.compile(model.encoder, dynamic=True)
    return model


def build_optimizer(args, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return optim.AdaBelief(params, lr=args.lr, weight_decay=args.weight_decay)


def epoch_plan(args, train_data, epoch):
    """The epoch's steps, rebuilt identically from (seed, epoch): resuming needs no sampler state."""
    rng = random.Random(args.seed * 1000 + epoch)
    task_batches = {task: (lambda r, lengths=data.lengths: samplers.length_bucketed_batches(lengths, args.batch_size, r))
                    for task, data in train_data.items()}
    return samplers.make_plan(args.sampler, task_batches, rng, alpha=args.alpha)


def task_loss(task, outputs, labels):
    if task == "sts":
        return losses.similarity_mse_loss(outputs, labels)
    if task == "para":
        return losses.binary_cross_entropy_loss(outputs, labels)
    return losses.cross_entropy_loss(outputs, labels)


# ----------------------------------------------------------------------------- evaluation and output

@torch.no_grad()
def predict(model, data, args, device):
    """The head's predictions for every example of `data`, in file order."""
    model.eval()
    predicted = [None] * len(data)
    for indices in data.ordered_batches(args.eval_batch_size):
        batch = tasks.move_batch(data.batch(indices), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = model(data.task, batch["inputs"])
        for i, value in zip(indices, tasks.predictions_from_outputs(data.task, outputs.float()).tolist()):
            predicted[i] = value
    return predicted


def evaluate(model, dev_data, args, device):
    scores = {task: tasks.task_score(task, predict(model, data, args, device), data.labels)
              for task, data in dev_data.items()}
    return scores, tasks.overall_score(scores)


def write_predictions(path, data, predicted):
    """One CS224N leaderboard file: `id \\t Column ` header, then `id , prediction ` rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"id \t {tasks.PREDICTION_COLUMNS[data.task]} \n")
        for example, value in zip(data.examples, predicted):
            f.write(f"{example.id} , {value:.4f} \n" if data.task == "sts" else f"{example.id} , {value} \n")
    os.replace(tmp, path)


def save_atomically(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None


def print_table(title, rows):
    print(title)
    for name, value in rows:
        print(f"  {name:<10} {value:.4f}")


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    checkpoint_dir = Path(args.bert) if args.bert else default_checkpoint_path()
    tokenizer = BertTokenizer.from_pretrained(checkpoint_dir)
    out_dir = Path(args.out_dir)
    log = tqdm.write

    dev_data = {t: load_split(args, tokenizer, t, "dev", args.eval_limit, log) for t in args.tasks}
    test_data = {t: load_split(args, tokenizer, t, "test-student", args.eval_limit, log) for t in args.tasks}
    model = build_model(args, checkpoint_dir, device)
    if len(tokenizer) > model.encoder.config.vocab_size:
        raise RunError(f"{checkpoint_dir}: vocab.txt has {len(tokenizer)} tokens but the model only "
                       f"{model.encoder.config.vocab_size} embeddings")

    if args.eval_only:
        model.load_state_dict(load_model_state(args.checkpoint, model))
    else:
        train_data = {t: load_split(args, tokenizer, t, "train", args.limit, log) for t in args.tasks}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        train(args, model, train_data, dev_data, device, out_dir)
        model.load_state_dict(load_model_state(out_dir / "best.pt", model))

    scores, overall = evaluate(model, dev_data, args, device)
    for task in args.tasks:
        write_predictions(out_dir / "predictions" / f"{task}-dev-output.csv", dev_data[task],
                          predict(model, dev_data[task], args, device))
        write_predictions(out_dir / "predictions" / f"{task}-test-output.csv", test_data[task],
                          predict(model, test_data[task], args, device))
    print_table("best model, dev:", [*scores.items(), ("overall", overall)])
    print(f"predictions written to {out_dir / 'predictions'}")
    return scores


def load_model_state(path, model):
    state = load_checkpoint(path)
    state = state.get("model", state)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise RunError(f"{path}: does not fit this model (missing {sorted(missing)[0]!r}; check --tasks)")
    return state


def train(args, model, train_data, dev_data, device, out_dir):
    optimizer = build_optimizer(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    regulariser = None
    if args.smart:
        import smart
        regulariser = smart.SmartRegulariser(model, lambda_s=args.smart_lambda, eps=args.smart_eps,
                                             sigma=args.smart_sigma, step_size=args.smart_step,
                                             n_steps=args.smart_steps, mu=args.bregman_mu, beta=args.bregman_beta)
    start_epoch, start_step, best, bad_in_a_row, skipped = 0, 0, -math.inf, 0, 0
    if args.resume:
        state = load_checkpoint(out_dir / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if regulariser is not None:
            regulariser.load_state_dict(state["smart"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, start_step, best, skipped = state["epoch"], state["step"], state["best"], state["skipped"]
        tqdm.write(f"resuming from {out_dir / 'last.pt'}: epoch {start_epoch + 1}, step {start_step}")

    def checkpoint(epoch, step):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                 "best": best, "skipped": skipped, "torch_rng": torch.get_rng_state()}
        if regulariser is not None:
            state["smart"] = regulariser.state_dict()
        save_atomically(state, out_dir / "last.pt")

    for epoch in range(start_epoch, args.epochs):
        plan = epoch_plan(args, train_data, epoch)
        model.train()
        started, total_loss, n_steps = time.time(), 0.0, 0
        bar = tqdm(range(start_step, len(plan)), desc=f"epoch {epoch + 1}/{args.epochs}", total=len(plan),
                   initial=start_step, dynamic_ncols=True, file=sys.stderr)
        for step in bar:
            batches = {task: tasks.move_batch(train_data[task].batch(indices), device)
                       for task, indices in plan[step].items()}
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                task_losses = {task: task_loss(task, model(task, b["inputs"]), b["labels"]).float()
                               for task, b in batches.items()}
                loss = losses.combine_losses(task_losses, args.loss, args.focus)
                if regulariser is not None:
                    loss = loss + regulariser(batches)
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
                try:  # with clipping off, an infinite max_norm still checks the norm is finite
                    optim.clip_grad_norm(params, args.clip_grad if args.clip_grad > 0 else math.inf)
                except optim.NonFiniteGradientError:
                    ok = False
            if not ok:
                skipped += 1
                bad_in_a_row += 1
                tqdm.write(f"step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
                if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                    raise RunError(f"{bad_in_a_row} non-finite steps in a row: lower --lr or set --clip_grad")
                continue
            bad_in_a_row = 0
            optimizer.step()
            if regulariser is not None:
                regulariser.update_teacher()
            total_loss += loss.item()
            n_steps += 1
            bar.set_postfix(loss=f"{total_loss / n_steps:.4f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(plan):
                checkpoint(epoch, step + 1)
        bar.close()
        start_step = 0

        scores, overall = evaluate(model, dev_data, args, device)
        record = {"epoch": epoch + 1, "train_loss": total_loss / max(n_steps, 1), "dev": scores,
                  "overall": overall, "seconds": round(time.time() - started, 1), "skipped_steps": skipped}
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print_table(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, dev:",
                    [*scores.items(), ("overall", overall)])
        if overall > best:
            best = overall
            save_atomically({"model": model.state_dict(), "epoch": epoch + 1, "dev": scores}, out_dir / "best.pt")
        checkpoint(epoch + 1, 0)


def cli():
    try:
        main()
    except (tasks.DataError, CheckpointError, RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: resume with the same flags plus --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
