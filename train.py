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

Reliability. Input a user can get wrong (a missing or malformed data file, a damaged checkpoint,
flags that contradict each other) is checked before anything is written, and ends the run with
one line on stderr and exit status 2. A NaN or inf loss or gradient skips the step (counted in
metrics.jsonl); MAX_BAD_STEPS_IN_A_ROW such steps stop the run. last.pt (weights, optimizer,
position in the epoch's plan, RNG states, the run's flags) is replaced atomically at the end of
every epoch and every --save_every steps; `--resume` continues from it and ends with the same
weights, bit for bit on the same CPU, as a run that was never stopped.

Data parallel. Under torchrun, N processes (ranks) train one model together, on N GPUs (nccl)
or on the CPU (gloo):

    torchrun --nproc_per_node 4 train.py --loss gls --sampler roundrobin --data_dir ../shared/data

Every rank builds the same epoch plan from (seed, epoch) and takes every N-th example of each of
the step's batches, so a step sees the same global batch (--batch_size per task) as one process
does, and the ranks' gradients add up to one process's gradient on it (see global_means). Each
rank evaluates every N-th dev batch and the predictions are gathered. Rank 0 alone prints and
writes files; every rank must see --out_dir (one machine, or a shared file system).
"""
import argparse
import atexit
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import losses
import optim
import samplers
import tasks
from bert import BertConfig, BertModel, CheckpointError, default_checkpoint_path
from tokenizer import BertTokenizer

MAX_BAD_STEPS_IN_A_ROW = 20  # non-finite steps skipped in a row before the run is stopped
RANK, WORLD_SIZE = 0, 1  # this process and the number of processes; set under torchrun by start_distributed


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line a user can act on."""


# ----------------------------------------------------------------------------- flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not the whole usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (python train.py --help lists the flags)\n")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-3 pretrain, 1e-4 finetune; the study's finetune rate, 1e-5, "
                        "measured worse on the default checkpoint, see README)")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--lr_schedule", choices=["constant", "linear"], default="linear",
                   help="linear: the learning rate falls in a straight line from --lr to 0 over the run; "
                        "constant: the study's")
    g.add_argument("--warmup", type=float, default=0.0,
                   help="fraction of the run over which the learning rate first rises from 0 to --lr "
                        "(BERT's warm-up; 0 = none)")
    g.add_argument("--layer_decay", type=float, default=1.0,
                   help="layer-wise learning rate decay: the heads train at --lr, the top encoder layer at "
                        "--lr*D, the next at --lr*D^2, ..., the embeddings at --lr*D^(layers+1) (1 = off)")
    g.add_argument("--fused_optimizer", action="store_true",
                   help="compile the optimizer's update into one pass per tensor (torch.compile, a few seconds "
                        "once; the step then costs about 1.4x torch's fused AdamW on CPU instead of 2.3x)")
    g.add_argument("--clip_grad", type=float, default=0.0, help="max global gradient L2 norm (0 = off)")
    g.add_argument("--hidden_dropout_prob", type=float, default=0.1,
                   help="dropout in the encoder and heads (the study's 0.3 measured worse on the default checkpoint)")
    g.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                   help="sentence vector the classification heads read: mean of the tokens, or BERT's [CLS] pooler")
    g.add_argument("--swap_pairs", action="store_true",
                   help="para: train on each question pair in both orders (alternate steps swapped) and "
                        "predict from the mean logit of the two orders, at twice the cost of a para dev pass; "
                        "being a paraphrase is symmetric, a cross-encoder is not")
    g.add_argument("--batch_size", type=int, default=32,
                   help="examples per task per step (the study's 8 measured worse for the main command, README)")
    g.add_argument("--epochs", type=int, default=3,
                   help="the study ran 10; for the main command 5 measured no better than 3 (README)")
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
    g.add_argument("--eval_only", action="store_true", help="evaluate --checkpoint (without it: the --bert "
                   "checkpoint as it is, heads untrained) and write predictions")
    g.add_argument("--checkpoint", default=None, help="model checkpoint (best.pt, last.pt) for --eval_only")
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
    if args.loss == "fls" and not args.focus:
        p.error("--loss fls needs at least one --focus task")
    if args.loss == "fls" and not set(args.focus) <= set(args.tasks):
        p.error(f"--focus {','.join(args.focus)} names a task not in --tasks {','.join(args.tasks)}")
    if args.lr is None:
        args.lr = 1e-3 if args.option == "pretrain" else 1e-4
    for name in ("lr", "warmup", "layer_decay", "alpha", "weight_decay", "clip_grad", "hidden_dropout_prob",
                 "smart_lambda", "smart_eps", "smart_sigma", "smart_step", "bregman_mu", "bregman_beta"):
        if not math.isfinite(getattr(args, name)):
            p.error(f"--{name} must be a finite number, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    for name in ("batch_size", "epochs", "max_length", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    for name in ("limit", "eval_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.max_length < 3:
        p.error("--max_length must be at least 3 (room for [CLS] and two [SEP]s)")
    if args.max_length > 512:
        p.error("--max_length cannot exceed 512 (BERT's position embeddings)")
    if not 0 <= args.warmup < 1:
        p.error("--warmup must lie in [0, 1)")
    if not 0 < args.layer_decay <= 1:
        p.error("--layer_decay must lie in (0, 1]")
    if not 0 <= args.hidden_dropout_prob < 1:
        p.error("--hidden_dropout_prob must lie in [0, 1)")
    if args.weight_decay < 0 or args.clip_grad < 0 or args.save_every < 0:
        p.error("--weight_decay, --clip_grad and --save_every cannot be negative")
    if args.checkpoint and not args.eval_only:
        p.error("--checkpoint is only read with --eval_only (to continue a run, use --resume)")
    if args.eval_only and args.resume:
        p.error("--eval_only and --resume exclude each other")
    if args.smart and not (args.smart_steps >= 0 and args.smart_eps > 0 and 0 <= args.bregman_beta < 1):
        p.error("SMART needs --smart_steps >= 0, --smart_eps > 0 and 0 <= --bregman_beta < 1")
    if args.smart and min(args.smart_lambda, args.bregman_mu, args.smart_sigma, args.smart_step) < 0:
        p.error("SMART needs --smart_lambda, --bregman_mu, --smart_sigma and --smart_step >= 0")
    if args.out_dir is None:
        args.out_dir = str(Path("runs") / run_name(args))
    return args


def run_name(args):
    name = (f"{args.option}-{'+'.join(args.tasks)}-{args.loss}-{args.sampler}-{args.optimizer}-lr{args.lr:g}"
            f"-b{args.batch_size}")
    if args.lr_schedule != "linear":
        name += f"-{args.lr_schedule}"
    if args.warmup:
        name += f"-warmup{args.warmup:g}"
    if args.layer_decay != 1:
        name += f"-decay{args.layer_decay:g}"
    if args.swap_pairs:
        name += "-swap"
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


def load_split(args, tokenizer, task, split, limit, report):
    examples = tasks.read_examples(args.data_dir, task, split, report=report)
    if limit is not None and limit < len(examples) and split == "train":
        # a seeded sample, not the first rows: the SST file, for one, lists positive reviews first
        keep = sorted(random.Random(args.seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    elif limit is not None:
        examples = examples[:limit]  # dev/test: the first rows, so outputs line up with the files
    both_orders = args.swap_pairs and task == "para"
    return tasks.TaskData(task, examples, tokenizer, args.max_length, both_orders=both_orders)


def build_model(args, checkpoint_dir, device):
    encoder = BertModel.from_pretrained(checkpoint_dir, hidden_dropout_prob=args.hidden_dropout_prob)
    model = tasks.MultitaskBert(encoder, args.tasks, args.hidden_dropout_prob, args.pooling)
    if args.option == "pretrain":
        for param in model.encoder.parameters():
            param.requires_grad_(False)
    model.to(device)
    if args.compile:  # compiled in place: state_dict names, and so checkpoints, stay the same
        model.encoder.compile(dynamic=True)
    return model


def layer_depth(name, n_layers):
    """How far below the heads a parameter sits: 0 for the heads (and the pooler), 1 for the top
    encoder layer, ..., n_layers for the bottom one, n_layers + 1 for the embeddings."""
    parts = name.split(".")
    if parts[:2] == ["encoder", "embeddings"]:
        return n_layers + 1
    if parts[:2] == ["encoder", "layers"]:
        return n_layers - int(parts[2])
    return 0


def parameter_groups(args, model):
    """The trainable parameters, in one group, or with --layer_decay D < 1 one group per depth with
    lr_scale D^depth: discriminative fine-tuning (Howard & Ruder, 2018; Sun et al., 2019, sec. 5.3),
    on the view that lower layers hold general features a small task should change least."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if args.layer_decay == 1:
        return [{"params": [p for _, p in named], "lr_scale": 1.0}]
    n_layers = model.encoder.config.num_hidden_layers
    by_depth = {}
    for name, p in named:
        by_depth.setdefault(layer_depth(name, n_layers), []).append(p)
    return [{"params": ps, "lr_scale": args.layer_decay ** depth} for depth, ps in sorted(by_depth.items())]


def build_optimizer(args, model):
    # nothing to train: pretrain (encoder frozen) with only weightless heads, STS's being a cosine
    if not any(p.requires_grad for p in model.parameters()):
        raise RunError(f"--option {args.option} --tasks {','.join(args.tasks)} has nothing to train: the encoder "
                       "is frozen and these heads have no weights (score the checkpoint as it is with --eval_only)")
    kind = optim.AdamW if args.optimizer == "adamw" else optim.AdaBelief
    optimizer = kind(parameter_groups(args, model), lr=args.lr, weight_decay=args.weight_decay,
                     fused=args.fused_optimizer)
    if args.fused_optimizer:
        try:
            optim.compile_fused_update(optimizer)
        except Exception as error:  # whatever the compiler stack raises, the remedy is the same
            raise RunError(f"--fused_optimizer: torch.compile could not build the update "
                           f"({type(error).__name__}: {one_line(error)}); run without --fused_optimizer") from None
    return optimizer


def build_regulariser(args, model):
    if not args.smart:
        return None
    import smart
    return smart.SmartRegulariser(model, lambda_s=args.smart_lambda, eps=args.smart_eps, sigma=args.smart_sigma,
                                  step_size=args.smart_step, n_steps=args.smart_steps, mu=args.bregman_mu,
                                  beta=args.bregman_beta)


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


# ----------------------------------------------------------------------------- data parallel (torchrun)

def start_distributed(choice):
    """The device this process runs on. Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the
    environment) also join the process group, once per process (a later main() call reuses it):
    nccl on CUDA, with one GPU per local rank; gloo on CPU."""
    global RANK, WORLD_SIZE
    device = pick_device(choice)
    if "RANK" not in os.environ:
        RANK, WORLD_SIZE = 0, 1
        return device
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} CUDA "
                           "device(s): start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    RANK, WORLD_SIZE = dist.get_rank(), dist.get_world_size()
    return device


def barrier():
    if WORLD_SIZE > 1:
        dist.barrier()


def log(message):
    """A line on stdout that leaves the progress bar intact; rank 0 alone speaks."""
    if RANK == 0:
        tqdm.write(message)


def shard(indices):
    """This rank's part of one global batch, and its share of the batch: indices[RANK::WORLD_SIZE].
    A batch smaller than the number of ranks leaves some ranks nothing; such a rank takes the
    batch's first example with share 0, so that every rank still runs the same forwards and
    backwards (the same parameters get gradients, and the collectives match up)."""
    mine = indices[RANK::WORLD_SIZE]
    if not mine:
        return indices[:1], 0.0
    return mine, len(mine) / len(indices)


def global_means(local_means, shares):
    """{task: this rank's batch mean} -> {task: the global batch's mean}, whose value is the same
    on every rank and whose gradient is this rank's part of the global mean's gradient.

    With n_r of a task's B examples on rank r, and m_r their mean, the global batch mean is
        M = sum_r (n_r / B) m_r,  so  dM/dθ = sum_r (n_r / B) dm_r/dθ.
    Each rank all-reduces the values (n_r / B) m_r to get M, and returns M + (n_r / B)(m_r - m_r),
    with the second m_r detached: its value is exactly M, its gradient is rank r's term of dM/dθ.
    A combined loss C(M_1, .., M_n) computed from these is then the same number on every rank, and
    its backward gives dC/dM_t (at the global M, as GLS and FLS need) times rank r's terms; summing
    the ranks' gradients (all_reduce_gradients) gives exactly one process's gradient of C on the
    global batch, however unevenly the batch was split. (Averaging per-rank gradients of C(m_r)
    would not: GLS and FLS are nonlinear in the task losses, and the shards need not be equal.)
    Non-finite values stay non-finite in M, so every rank skips the same steps."""
    if WORLD_SIZE == 1:
        return local_means
    totals = torch.stack([m.detach().float() * shares[task] for task, m in local_means.items()])
    dist.all_reduce(totals)
    return {task: total + shares[task] * (m - m.detach()) for (task, m), total in zip(local_means.items(), totals)}


@torch.no_grad()
def all_reduce_gradients(params):
    """Sum every gradient over the ranks (each rank's already carries only its share, see
    global_means), through one flat buffer: one collective per step, not one per tensor.

    A manual all-reduce rather than DistributedDataParallel: a step here runs several forwards
    (one per task, and SMART's clean, ascent, perturbed and teacher passes) before its one
    backward, which DDP's per-forward gradient hooks do not expect; one all-reduce after the
    backward is correct for any number of forwards, at the cost of not overlapping the
    communication with the backward pass. Every rank runs the same tasks (see shard), so the
    same parameters have gradients, in the same order, on every rank."""
    if WORLD_SIZE == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(summed.view_as(grad))


def gathered(obj):
    """[every rank's obj], in rank order (all ranks must call it)."""
    if WORLD_SIZE == 1:
        return [obj]
    objs = [None] * WORLD_SIZE
    dist.all_gather_object(objs, obj)
    return objs


# ----------------------------------------------------------------------------- evaluation and output

@torch.no_grad()
def predict(model, data, args, device):
    """The head's predictions for every example of `data`, in file order. Under torchrun each rank
    predicts every WORLD_SIZE-th batch, and every rank gets all the predictions."""
    model.eval()
    predicted = {}
    for indices in data.ordered_batches(args.eval_batch_size)[RANK::WORLD_SIZE]:
        batch = tasks.move_batch(data.batch(indices), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = model(data.task, batch["inputs"])
        predicted.update(zip(indices, tasks.predictions_from_outputs(data.task, outputs.float()).tolist()))
    predicted = {i: value for part in gathered(predicted) for i, value in part.items()}
    return [predicted[i] for i in range(len(data))]


def evaluate(model, dev_data, args, device):
    """Dev scores per task, the overall score, and the predictions they were computed from."""
    predicted = {task: predict(model, data, args, device) for task, data in dev_data.items()}
    scores = {task: tasks.task_score(task, predicted[task], data.labels) for task, data in dev_data.items()}
    return scores, tasks.overall_score(scores), predicted


def write_predictions(path, data, predicted):
    """One CS224N leaderboard file: `id \\t Column ` header, then `id , prediction ` rows (rank 0 writes)."""
    if RANK != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"id \t {tasks.PREDICTION_COLUMNS[data.task]} \n")
        for example, value in zip(data.examples, predicted):
            f.write(f"{example.id} , {value:.4f} \n" if data.task == "sts" else f"{example.id} , {value} \n")
    os.replace(tmp, path)


def print_table(title, rows):
    if RANK != 0:
        return
    print(title)
    for name, value in rows:
        print(f"  {name:<10} {value:.4f}")


# ----------------------------------------------------------------------------- checkpoints

def save_atomically(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, mmap=False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None


def checked_model_state(path, state, model):
    """`state` if it is a state dict that fits `model` exactly, else RunError saying what is off."""
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise RunError(f"{path}: not a model checkpoint (best.pt or last.pt from train.py)")
    expected = model.state_dict()
    for kind, names in (("missing", set(expected) - set(state)), ("unexpected", set(state) - set(expected))):
        if names:
            raise RunError(f"{path}: does not fit this model ({kind} {sorted(names)[0]!r}; check --tasks)")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise RunError(f"{path}: {name!r} has shape {tuple(state[name].shape)}, this model's "
                           f"{tuple(tensor.shape)} (check --bert)")
    return state


def load_model_state(path, model):
    state = load_checkpoint(path)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    return checked_model_state(path, state, model)


def new_progress():
    """Where a run stands. Saved in last.pt, so that a resumed run goes on exactly where it stopped."""
    return {"epoch": 0, "step": 0,               # epochs finished; steps of the current epoch done
            "total_loss": 0.0, "n_steps": 0,     # the current epoch's training loss so far
            "skipped": 0, "bad_in_a_row": 0,     # non-finite steps: all of them, and in a row now
            "best": -math.inf, "best_epoch": 0,  # best overall dev score so far, and its epoch
            "history": []}                       # the records of metrics.jsonl, one per epoch


def rng_states(device):
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def save_resumable(path, args, model, optimizer, regulariser, progress, device):
    """Every rank calls it (each rank's RNG states are gathered: its dropout masks are its own);
    rank 0 writes. The ranks' weights, optimizer and SMART states are the same: rank 0's are saved."""
    ranks_rng = gathered(rng_states(device))
    if RANK != 0:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress,
             "args": vars(args), **ranks_rng[0]}
    if WORLD_SIZE > 1:
        state["ranks_rng"] = ranks_rng
    if regulariser is not None:
        state["smart"] = regulariser.state_dict()
    save_atomically(state, path)


# Flags that say where a run reads and writes and how fast it goes, not what it learns.
NOT_TRAINING = {"save_every", "device", "compile", "fused_optimizer", "eval_batch_size", "data_dir", "bert", "out_dir",
                "resume", "eval_only", "checkpoint"}
# Flags a resumed run may change (--epochs only at a constant rate without warm-up, see resume);
# every other flag must be the one last.pt was saved with.
MAY_CHANGE_ON_RESUME = NOT_TRAINING | {"epochs"}
# Flags added after runs had been saved without them, with the value that does what those runs did.
BEFORE_THE_FLAG = {"lr_schedule": "constant", "warmup": 0.0, "layer_decay": 1.0, "swap_pairs": False}


def check_out_dir(args, out_dir):
    """A new run must not mix its files with an old run's; --resume needs the old run's last.pt."""
    if args.resume and not (out_dir / "last.pt").is_file():
        raise RunError(f"--resume: {out_dir / 'last.pt'} not found, nothing to resume (start without --resume)")
    old = [name for name in ("last.pt", "best.pt", "metrics.jsonl") if (out_dir / name).exists()]
    if not args.resume and old:
        raise RunError(f"{out_dir} already holds a run ({old[0]}): add --resume to continue it, "
                       "or choose another --out_dir")


def resume(args, out_dir, model, optimizer, regulariser, device):
    """Load last.pt into the model, optimizer, SMART teacher and RNGs and return its progress;
    refuse a last.pt saved with other flags. Then bring best.pt and metrics.jsonl in line."""
    path = out_dir / "last.pt"
    state = load_checkpoint(path)
    if not (isinstance(state, dict) and {"model", "optimizer", "progress", "args", "torch_rng"} <= set(state)):
        raise RunError(f"{path}: not a resumable checkpoint of this train.py")
    now, saved = vars(args), {**BEFORE_THE_FLAG, **state["args"]}
    for name in now.keys() - MAY_CHANGE_ON_RESUME:
        if name in saved and saved[name] != now[name]:
            raise RunError(f"--resume: {path} was saved with --{name} {flag_text(saved[name])}, not "
                           f"{flag_text(now[name])}; resume with the run's own flags")
    scheduled = ([f"--lr_schedule {now['lr_schedule']}"] if now["lr_schedule"] != "constant" else []) + \
        ([f"--warmup {now['warmup']:g}"] if now["warmup"] > 0 else [])
    if scheduled and saved.get("epochs") != now["epochs"]:
        raise RunError(f"--resume: {path} was saved with --epochs {flag_text(saved.get('epochs'))}; with "
                       f"{' '.join(scheduled)} the epochs set the schedule and cannot change")
    model.load_state_dict(checked_model_state(path, state["model"], model))
    try:
        optimizer.load_state_dict(state["optimizer"])
        if regulariser is not None:
            regulariser.load_state_dict(state.get("smart"))
        ranks_rng = state.get("ranks_rng", [state])  # one entry per rank if saved under torchrun
        rng = ranks_rng[RANK] if len(ranks_rng) == WORLD_SIZE else state
        torch.set_rng_state(rng["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in rng:
            torch.cuda.set_rng_state(rng["cuda_rng"], device)
        if len(ranks_rng) != WORLD_SIZE and RANK > 0:  # another number of ranks: same batches, new dropout masks
            torch.manual_seed(args.seed + RANK)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RunError(f"{path}: its optimizer or SMART state does not fit this run ({one_line(e)})") from None
    progress = state["progress"]
    if RANK == 0:  # the others wait for it at main's barrier
        settle_run_files(out_dir, progress)
    return progress


def flag_text(value):
    return ",".join(value) if isinstance(value, list) else str(value)


def settle_run_files(out_dir, progress):
    """Make best.pt and metrics.jsonl agree with last.pt's progress.

    An epoch ends by writing best.pt.new (if the epoch is the best so far), then last.pt (the
    commit point), then renaming best.pt.new to best.pt and rewriting metrics.jsonl. A run killed
    in between is finished here: a best.pt.new of the epoch last.pt calls best becomes best.pt,
    one of an epoch that last.pt has not recorded is dropped (that epoch is trained again)."""
    pending = out_dir / "best.pt.new"
    if pending.exists():
        if saved_epoch(pending) == progress["best_epoch"]:
            os.replace(pending, out_dir / "best.pt")
        else:
            pending.unlink()
    for name in ("last.pt.tmp", "best.pt.new.tmp", "metrics.jsonl.tmp"):  # left by a kill mid-write
        (out_dir / name).unlink(missing_ok=True)
    if progress["best_epoch"] and saved_epoch(out_dir / "best.pt") != progress["best_epoch"]:
        raise RunError(f"{out_dir / 'best.pt'} is missing or does not hold epoch {progress['best_epoch']}, "
                       "the best epoch last.pt records; start the run again in a new --out_dir")
    write_metrics(out_dir, progress["history"])


def saved_epoch(path):
    """The `epoch` field of a best.pt, read without loading its tensors (None if unreadable)."""
    try:
        return load_checkpoint(path, mmap=True).get("epoch")
    except (RunError, AttributeError):  # unreadable, or not a dict
        return None


def write_metrics(out_dir, history):
    """metrics.jsonl, one line per finished epoch, rewritten whole and atomically from `history`."""
    tmp = out_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    os.replace(tmp, out_dir / "metrics.jsonl")


def read_metrics(out_dir, without=()):
    """The records of <out_dir>/metrics.jsonl, one per finished epoch ([] before the first),
    without the fields named in `without` (tests drop the wall-clock "seconds")."""
    path = Path(out_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [{k: v for k, v in record.items() if k not in without} for record in records]


def one_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    device = start_distributed(args.device)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)

    # Everything a user can get wrong is checked, and all input read, before out_dir is touched.
    checkpoint_dir = Path(args.bert) if args.bert else default_checkpoint_path()
    tokenizer = load_tokenizer(checkpoint_dir)
    check_checkpoint_fits(args, tokenizer, checkpoint_dir)
    if not args.eval_only:
        check_out_dir(args, out_dir)
    dev_data = {t: load_split(args, tokenizer, t, "dev", args.eval_limit, log) for t in args.tasks}
    test_data = {t: load_split(args, tokenizer, t, "test-student", args.eval_limit, log) for t in args.tasks}
    train_data = {} if args.eval_only else {t: load_split(args, tokenizer, t, "train", args.limit, log)
                                            for t in args.tasks}
    model = build_model(args, checkpoint_dir, device)  # the same seed: the same weights on every rank
    if RANK > 0:  # but each rank its own dropout masks (and SMART noise); rank 0 keeps one process's
        torch.manual_seed(args.seed + RANK)

    if args.eval_only:
        if args.checkpoint:  # without one, the released encoder is scored as it is
            model.load_state_dict(load_model_state(args.checkpoint, model))
    else:
        optimizer, regulariser = build_optimizer(args, model), build_regulariser(args, model)
        progress = resume(args, out_dir, model, optimizer, regulariser, device) if args.resume else new_progress()
        barrier()  # every rank has checked out_dir and read last.pt before rank 0 writes there
        if RANK == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        if args.resume:
            log(f"resuming from {out_dir / 'last.pt'}: epoch {progress['epoch'] + 1}, step {progress['step']}")
        train(args, model, optimizer, regulariser, progress, train_data, dev_data, device, out_dir)
        barrier()  # rank 0 has written best.pt
        model.load_state_dict(load_model_state(out_dir / "best.pt", model))

    scores, overall, dev_predicted = evaluate(model, dev_data, args, device)
    for task in args.tasks:
        write_predictions(out_dir / "predictions" / f"{task}-dev-output.csv", dev_data[task], dev_predicted[task])
        write_predictions(out_dir / "predictions" / f"{task}-test-output.csv", test_data[task],
                          predict(model, test_data[task], args, device))
    print_table("best model, dev:", [*scores.items(), ("overall", overall)])
    if RANK == 0:  # the run's summary, read by results/table.py; written last, so it marks a finished run
        summary = {"dev": scores, "overall": overall, "seconds": round(time.time() - started, 1)}
        (out_dir / "scores.json.tmp").write_text(json.dumps(summary) + "\n")
        os.replace(out_dir / "scores.json.tmp", out_dir / "scores.json")
    log(f"predictions written to {out_dir / 'predictions'}")
    return scores


def training_step(args, model, optimizer, regulariser, params, batches, shares, device):
    """One optimizer step on one step's task batches (this rank's shards of them, and `shares`,
    each shard's share of its global batch). Returns the loss, or None when the loss or a
    gradient is NaN or inf: then the step is skipped and the weights stay as they were.

    Under torchrun the task losses (and SMART's terms) become the global batch's means before
    they are combined, and the gradients are summed over the ranks after the backward: see
    global_means and all_reduce_gradients. The loss and the summed gradients are the same on every
    rank, so every rank takes the same decision to skip or to step."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        task_losses = global_means({task: task_loss(task, model(task, b["inputs"]), b["labels"]).float()
                                    for task, b in batches.items()}, shares)
        loss = losses.combine_losses(task_losses, args.loss, args.focus)
        if regulariser is not None:
            loss = loss + smart_term(regulariser, batches, shares)
    if not torch.isfinite(loss):
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


def smart_term(regulariser, batches, shares):
    """regulariser(batches): the sum over the step's tasks of λ_s R_s + μ D_Breg, each a batch mean.
    Under torchrun each task's term is made its global batch's mean first, as the task losses are."""
    if WORLD_SIZE == 1:
        return regulariser(batches)
    return sum(global_means({task: regulariser({task: b}) for task, b in batches.items()}, shares).values())


def learning_rate(args, done):
    """The step's learning rate, from the fraction of training `done` before it (0 at the first
    step): --lr throughout, or with --lr_schedule linear falling in a straight line to 0 at the end,
    the linear decay of BERT's recipe (Devlin et al. 2019). With --warmup W the rate first rises
    from 0 to --lr over the fraction W of the run, as in that recipe, and the decay takes the rest.
    A function of (epoch, step) alone, so a resumed run steps with the same rates."""
    if done < args.warmup:
        return args.lr * done / args.warmup
    if args.lr_schedule == "linear":
        return args.lr * (1 - done) / (1 - args.warmup)
    return args.lr


def set_learning_rate(args, optimizer, done):
    lr = learning_rate(args, done)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # a last.pt from before lr_scale has one group


def train(args, model, optimizer, regulariser, progress, train_data, dev_data, device, out_dir):
    """Train from `progress` (new_progress() or what resume() returned) to the end of the last epoch.
    Every rank runs this loop over the same plan; rank 0 alone writes files."""
    params = [p for p in model.parameters() if p.requires_grad]
    last = out_dir / "last.pt"
    checkpoint = lambda: save_resumable(last, args, model, optimizer, regulariser, progress, device)

    for epoch in range(progress["epoch"], args.epochs):
        plan = epoch_plan(args, train_data, epoch)
        model.train()
        started = time.time()
        bar = tqdm(range(progress["step"], len(plan)), desc=f"epoch {epoch + 1}/{args.epochs}", total=len(plan),
                   initial=progress["step"], dynamic_ncols=True, file=sys.stderr, disable=RANK != 0)
        for step in bar:
            set_learning_rate(args, optimizer, (epoch + step / len(plan)) / args.epochs)
            batches, shares = {}, {}
            for task, indices in plan[step].items():
                mine, shares[task] = shard(indices)
                # --swap_pairs: para's pairs in (q1, q2) order when epoch + step is even, else (q2, q1);
                # a function of (epoch, step) alone, like the plan, so a resumed run sees the same orders
                order = (epoch + step) % 2 if args.swap_pairs and task == "para" else None
                batches[task] = tasks.move_batch(train_data[task].batch(mine, order=order), device)
            loss = training_step(args, model, optimizer, regulariser, params, batches, shares, device)
            progress["step"] = step + 1
            if loss is None:
                progress["skipped"] += 1
                progress["bad_in_a_row"] += 1
                log(f"epoch {epoch + 1}, step {step}: non-finite loss or gradient, step skipped "
                    f"({progress['skipped']} so far)")
                if progress["bad_in_a_row"] >= MAX_BAD_STEPS_IN_A_ROW:
                    raise RunError(f"{progress['bad_in_a_row']} non-finite steps in a row (epoch {epoch + 1}, "
                                   f"step {step}): lower --lr or set --clip_grad")
                continue
            progress["bad_in_a_row"] = 0
            progress["total_loss"] += loss
            progress["n_steps"] += 1
            bar.set_postfix(loss=f"{progress['total_loss'] / progress['n_steps']:.4f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(plan):
                checkpoint()
        bar.close()

        scores, overall, _ = evaluate(model, dev_data, args, device)
        record = {"epoch": epoch + 1, "train_loss": progress["total_loss"] / max(progress["n_steps"], 1),
                  "dev": scores, "overall": overall, "seconds": round(time.time() - started, 1),
                  "skipped_steps": progress["skipped"]}
        print_table(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, dev:",
                    [*scores.items(), ("overall", overall)])
        progress.update(epoch=epoch + 1, step=0, total_loss=0.0, n_steps=0)
        progress["history"].append(record)
        score = overall if math.isfinite(overall) else -math.inf
        improved = progress["best_epoch"] == 0 or score > progress["best"]
        if improved:
            progress["best"], progress["best_epoch"] = score, epoch + 1
            if RANK == 0:
                save_atomically({"model": model.state_dict(), "epoch": epoch + 1, "dev": scores},
                                out_dir / "best.pt.new")
        checkpoint()  # the commit point: from here on this epoch is done (see settle_run_files)
        if RANK == 0:
            if improved:
                os.replace(out_dir / "best.pt.new", out_dir / "best.pt")
            write_metrics(out_dir, progress["history"])


def cli():
    try:
        main()
    except (tasks.DataError, CheckpointError, RunError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command with --resume to continue from the last checkpoint "
              "(last.pt in the run's folder)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
