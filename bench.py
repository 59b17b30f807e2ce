"""Speed and memory of minbert-mtl's hand-written parts against the reference libraries.

    python bench.py --data_dir ../shared/data                      # everything, torch's default threads
    OMP_NUM_THREADS=1 python bench.py --data_dir ../shared/data    # everything, one thread
    python bench.py --data_dir ../shared/data --quick              # tiny sizes: checks that it runs
    python bench.py --data_dir ../shared/data --only optimizer     # one section (a comma list)

Sections:
  encoder    bert.BertModel against transformers.BertModel (eager and sdpa attention) on the same
             checkpoint: forward, and forward + backward + optimizer step, on real SST sentences
             and Quora pairs, padded to a fixed 64 tokens or length-bucketed as train.py batches them.
  tokenizer  tokenizer.py against transformers' slow (pure Python) and fast (Rust) tokenizers.
  epoch      train.py's data path (ids cached once, length-bucketed batches, our model and AdamW)
             against a naive one (slow tokenizer in the collate function, random batches padded
             to 128, transformers.BertModel, torch.optim.AdamW).
  optimizer  one step of optim.AdamW / AdaBelief (foreach, and fused=True: compiled) against
             torch.optim.AdamW (for-loop, foreach, fused) on MiniLM's parameters.
  memory     peak memory of each, one fresh process per contender (see `memory_probe`).
A last table checks the project's speed targets.

How it is timed: the contenders take turns on every batch (every step, for the epoch), round
after round, in one process with the same threads and the same batches; a batch's time is its
median round, after a warm-up. A load spike then slows one contender's step, not its whole
measurement, so ratios stay fair on a shared machine even when absolute numbers do not. One thing
turn-taking cannot fix: when torch's threads outnumber the idle cores, every parallel region waits
for a thread that is not running, and many small ops (small batches) suffer far more than a few
big ones. On a busy machine, compare with OMP_NUM_THREADS=1. On CUDA the encoder runs under bf16
autocast and every timing is bracketed by torch.cuda.synchronize().
"""
import argparse
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import losses
import optim
import samplers
import tasks
from bert import BertModel, default_checkpoint_path
from tokenizer import BertTokenizer

SECTIONS = ("encoder", "tokenizer", "epoch", "optimizer", "memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="../shared/data", help="folder with the CS224N task files")
    p.add_argument("--quick", action="store_true", help="tiny sizes and two rounds: checks that it runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 5, quick 2)")
    p.add_argument("--memory_probe", default=None, help=argparse.SUPPRESS)  # internal, see memory_probe
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    return args


# ----------------------------------------------------------------------------- timing and tables

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_in_turns(contenders, rounds, device, warmup=1):
    """{name: median seconds of one call} for contenders {name: fn}, which take turns each round."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def time_batches_in_turns(contenders, batches, rounds, device):
    """{name: seconds for all batches} for contenders {name: fn(list of batches)}. The contenders
    take turns on every batch, so a load spike lasting one step hits one step, not one contender;
    each batch's time is its median over the rounds."""
    total = dict.fromkeys(contenders, 0.0)
    for i, batch in enumerate(batches):
        seconds = time_in_turns({name: functools.partial(fn, [batch]) for name, fn in contenders.items()},
                                rounds, device, warmup=1 if i == 0 else 0)
        for name, s in seconds.items():
            total[name] += s
    return total


def print_table(title, header, rows):
    """Text columns left-aligned, numbers right-aligned; floats with one decimal."""
    cells = [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    numeric = [isinstance(c, (int, float)) or str(c).endswith("x") for c in rows[0]]

    def line(row):
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(row, widths, numeric))
    print(f"\n{title}\n{line(header)}\n{line(['-' * w for w in widths])}")
    for row in cells:
        print(line(row))


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- real batches

def load_task_data(data_dir, task, tokenizer, limit=None):
    examples = tasks.read_examples(data_dir, task, "train", report=lambda _: None)[:limit]
    return tasks.TaskData(task, examples, tokenizer, max_length=128)


def pad_to(batch, length):
    """The batch cut or padded to exactly `length` positions, as a fixed-length pipeline feeds it."""
    return {name: F.pad(t[:, :length], (0, max(0, length - t.shape[1])), value=0)  # pad id, type, mask: 0
            for name, t in batch.items()}


def encoder_batches(datas, batch_size, n_batches, fixed_length=None, seed=0):
    """n_batches full batches taken in turn from each TaskData's length-bucketed batches (train.py's
    batching); with fixed_length, the same examples padded (or cut) to that many positions."""
    rng = random.Random(seed)
    per_task = [[b for b in samplers.length_bucketed_batches(d.lengths, batch_size, rng) if len(b) == batch_size]
                for d in datas]
    batches = []
    for i in range(n_batches):
        data, indices = datas[i % len(datas)], per_task[i % len(datas)][i // len(datas)]
        batch = data.batch(indices)["inputs"][0]
        batches.append(pad_to(batch, fixed_length) if fixed_length else batch)
    return batches


# ----------------------------------------------------------------------------- 1. encoder

OURS = "ours + optim.AdamW"
OURS_FUSED = "ours + optim.AdamW fused"
REFERENCES = [f"transformers {attention} + torch AdamW {kind}"
              for attention in ("eager", "sdpa") for kind in ("default", "fused")]


def load_encoder(name, checkpoint, device):
    """(model, optimizer) for a contender name: ours, or transformers with its attention and AdamW."""
    if name.startswith("ours"):
        model = BertModel.from_pretrained(checkpoint).to(device)
        return model, optim.AdamW(model.parameters(), lr=1e-5, fused=name.endswith("fused"))
    attention = name.split()[1]
    model = transformers.BertModel.from_pretrained(str(checkpoint), attn_implementation=attention).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if name.endswith("fused") else None)


def encoder_forward(model, batches, device):
    with torch.no_grad(), autocast(device):
        for batch in batches:
            model(**batch)


def encoder_train_steps(model, optimizer, batches, device):
    """Per batch: forward, a loss on the pooled output (what the SST head reads), backward, step."""
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            pooled = model(**batch)["pooler_output"]
        pooled.float().square().mean().backward()
        optimizer.step()


def bench_encoder(args, datas, checkpoint):
    # each reference pairing has its own model, so that two optimizers never share parameters
    encoders = {name: load_encoder(name, checkpoint, args.device) for name in [OURS, OURS_FUSED, *REFERENCES]}
    settings = [("fixed 64, batch 8", 8, 64, 4), ("fixed 64, batch 32", 32, 64, 2),  # (name, B, T, batches)
                ("bucketed, batch 8", 8, None, 8), ("bucketed, batch 32", 32, None, 4)]
    rows, summary = [], {}
    for setting, batch_size, fixed, n_batches in settings:
        batches = encoder_batches(datas, batch_size, max(1, n_batches // 4) if args.quick else n_batches, fixed)
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
        n_seqs = sum(len(b["input_ids"]) for b in batches)
        n_tokens = sum(b["input_ids"].numel() for b in batches)
        for model, _ in encoders.values():
            model.eval()
        forward = time_batches_in_turns({name.split(" +")[0]: functools.partial(encoder_forward, m, device=args.device)
                                         for name, (m, _) in encoders.items() if not name.endswith("fused")},
                                        batches, args.rounds, args.device)
        for model, _ in encoders.values():
            model.train()  # dropout on, as in training
        train = time_batches_in_turns({name: functools.partial(encoder_train_steps, m, o, device=args.device)
                                       for name, (m, o) in encoders.items()}, batches, args.rounds, args.device)
        for mode, seconds in (("forward", forward), ("train step", train)):
            ours = seconds[next(iter(seconds))]
            for name, s in seconds.items():
                rows.append([setting, f"{mode}: {name}", n_seqs / s, n_tokens / s, f"{s / ours:.2f}x"])
        summary[setting] = {
            "forward": min(s for n, s in forward.items() if n != "ours") / forward["ours"],
            "train, AdamW default": min(s for n, s in train.items() if n.endswith("default")) / train[OURS],
            "train, AdamW fused": (min(s for n, s in train.items() if n.endswith("fused") and n in REFERENCES)
                                   / train[OURS_FUSED])}
    print_table("1. encoder, all-MiniLM-L6-v2. forward: eval mode, no grad. train step: train mode (dropout "
                "0.1), loss on the pooled output, backward, optimizer step. tokens/s counts all positions of "
                "the padded batches. torch AdamW default: for-loop on CPU, foreach on CUDA. "
                "ours x = that row's time / our time",
                ["batches", "contender", "seq/s", "tokens/s", "ours x"], rows)
    return summary


# ----------------------------------------------------------------------------- 2. tokenizer

def encode_all(tokenizer, sentences):
    return [tokenizer.encode(s) for s in sentences]


def bench_tokenizer(args, sentences, checkpoint):
    with open(checkpoint / "vocab.txt", encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    slow = transformers.BertTokenizerLegacy.from_pretrained(str(checkpoint))
    fast = transformers.BertTokenizerFast.from_pretrained(str(checkpoint))
    warm = BertTokenizer(vocab)
    cold = "ours, cold cache (a new BertTokenizer per call, built inside the timing)"
    contenders = {
        cold: lambda: encode_all(BertTokenizer(vocab), sentences),
        "ours, warm cache (every word seen before)": lambda: encode_all(warm, sentences),
        "transformers slow (BertTokenizerLegacy), per sentence": lambda: encode_all(slow, sentences),
        "transformers fast (Rust), per sentence": lambda: encode_all(fast, sentences),
        "transformers fast (Rust), one batch call": lambda: fast(sentences)["input_ids"],
    }
    seconds = time_in_turns(contenders, args.rounds, torch.device("cpu"))
    rows = [[f"{len(sentences)} SST train", name, len(sentences) / s, f"{s / seconds[cold]:.2f}x"]
            for name, s in seconds.items()]
    print_table("2. tokenizer: text -> ids with [CLS]/[SEP]. ours x = that row's time / our cold-cache time. "
                "The fast tokenizer's batch call may use every CPU (Rust threads), whatever the torch threads",
                ["sentences", "contender", "sentences/s", "ours x"], rows)
    return {"cold vs slow": seconds["transformers slow (BertTokenizerLegacy), per sentence"] / seconds[cold]}


# ----------------------------------------------------------------------------- 3. an epoch of SST

def our_training_steps(data, checkpoint, device, batch_size=8, seed=0):
    """train.py's path for one task: ids cached in `data` (a tasks.TaskData), length-bucketed
    batches, MultitaskBert over bert.BertModel, the finite-gradient check, optim.AdamW.
    Returns step(): one training step on the next batch; it returns the batch's size."""
    torch.manual_seed(seed)
    model = tasks.MultitaskBert(BertModel.from_pretrained(checkpoint, hidden_dropout_prob=0.3), ["sst"], 0.3)
    model.to(device).train()
    params = list(model.parameters())
    optimizer = optim.AdamW(params, lr=1e-5)
    batches = iter(samplers.length_bucketed_batches(data.lengths, batch_size, random.Random(seed)))

    def step():
        batch = tasks.move_batch(data.batch(next(batches)), device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = losses.cross_entropy_loss(model("sst", batch["inputs"]), batch["labels"])
        loss.backward()
        optim.clip_grad_norm(params, math.inf)  # train.py's check that the gradient is finite
        optimizer.step()
        return len(batch["labels"])
    return step


def naive_training_steps(examples, checkpoint, device, batch_size=8, seed=0):
    """A first attempt at the same job: transformers' slow tokenizer runs in the DataLoader's
    collate function on every batch, batches are random and padded to 128, transformers.BertModel
    (its default attention, sdpa) with a linear head, torch.optim.AdamW with its defaults."""
    torch.manual_seed(seed)
    tokenizer = transformers.BertTokenizerLegacy.from_pretrained(str(checkpoint))

    def collate(batch):
        encoded = tokenizer([e.text for e in batch], padding="max_length", truncation=True, max_length=128,
                            return_tensors="pt")
        return dict(encoded), torch.tensor([e.label for e in batch])

    loader = iter(torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                              generator=torch.Generator().manual_seed(seed)))
    encoder = transformers.BertModel.from_pretrained(str(checkpoint), hidden_dropout_prob=0.3).to(device).train()
    head = nn.Sequential(nn.Dropout(0.3), nn.Linear(encoder.config.hidden_size, 5)).to(device).train()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-5)

    def step():
        inputs, labels = next(loader)
        inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
        optimizer.zero_grad()
        with autocast(device):
            loss = F.cross_entropy(head(encoder(**inputs).pooler_output).float(), labels)
        loss.backward()
        optimizer.step()
        return len(labels)
    return step


def bench_epoch(args, checkpoint):
    examples = tasks.read_examples(args.data_dir, "sst", "train", report=lambda _: None)
    n_steps = 6 if args.quick else 30
    start = time.perf_counter()
    data = tasks.TaskData("sst", examples, BertTokenizer.from_pretrained(checkpoint), max_length=128)
    tokenise_s = time.perf_counter() - start  # ours pays this once, before the first epoch
    ours, naive = "ours (train.py's path)", "naive (tokenise per batch, pad to 128)"
    pipelines = {ours: our_training_steps(data, checkpoint, args.device),
                 naive: naive_training_steps(examples, checkpoint, args.device)}
    for step in pipelines.values():  # warm-up
        step()
    n_examples, seconds = dict.fromkeys(pipelines, 0), dict.fromkeys(pipelines, 0.0)
    for _ in range(n_steps):  # the pipelines take turns, step by step
        for name, step in pipelines.items():
            sync(args.device)
            start = time.perf_counter()
            n_examples[name] += step()
            sync(args.device)
            seconds[name] += time.perf_counter() - start
    speed = {name: n_examples[name] / seconds[name] for name in pipelines}
    rows = [[f"{n_steps} steps", name, speed[name], f"{speed[ours] / speed[name]:.2f}x"] for name in pipelines]
    epoch_s = tokenise_s + len(examples) / speed[ours]  # a whole epoch, tokenising included
    rows.append(["1 epoch, est.", f"ours + tokenising all {len(examples)} sentences once ({tokenise_s:.1f} s)",
                 len(examples) / epoch_s, f"{len(examples) / speed[naive] / epoch_s:.2f}x"])
    print_table("3. SST training, batch 8, dropout 0.3, from the same checkpoint. ours x = our examples/s / "
                "that row's (last row: against naive)", ["span", "pipeline", "examples/s", "ours x"], rows)
    return {"steps": speed[ours] / speed[naive], "epoch": len(examples) / speed[naive] / epoch_s}


# ----------------------------------------------------------------------------- 4. optimizer step

OPTIMIZERS = ("optim.AdamW", "optim.AdamW fused", "optim.AdaBelief", "optim.AdaBelief fused",
              "torch AdamW for-loop", "torch AdamW foreach", "torch AdamW fused")


def minilm_parameters_with_grads(checkpoint, device):
    torch.manual_seed(0)
    params = [p.detach().requires_grad_() for p in BertModel.from_pretrained(checkpoint).to(device).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def make_optimizer(name, params):
    if name.startswith("optim."):  # "optim.AdamW" or "optim.AdamW fused" (compiled, one pass per tensor)
        kind = optim.AdamW if name.split()[0] == "optim.AdamW" else optim.AdaBelief
        return kind(params, lr=1e-5, fused=name.endswith("fused"))
    kind = name.split()[-1]
    return torch.optim.AdamW(params, lr=1e-5, foreach=kind == "foreach", fused=True if kind == "fused" else None)


def bench_optimizer(args, checkpoint):
    optimizers = {name: make_optimizer(name, minilm_parameters_with_grads(checkpoint, args.device))
                  for name in OPTIMIZERS}
    for optimizer in optimizers.values():
        for _ in range(6):  # creates the state, and gets AdaBelief past its cheaper SGD-like steps
            optimizer.step()
    seconds = time_in_turns({name: o.step for name, o in optimizers.items()}, 4 * args.rounds, args.device)
    n_params = sum(p.numel() for p in optimizers["optim.AdamW"].param_groups[0]["params"])
    fused = seconds["torch AdamW fused"]
    rows = [[f"{n_params / 1e6:.1f}M", name, s * 1e3, f"{s / fused:.2f}x"] for name, s in seconds.items()]
    print_table("4. one optimizer step on all-MiniLM-L6-v2's parameters with random gradients; "
                "x fused = time / torch's fused AdamW's time", ["params", "optimizer", "ms/step", "x fused"], rows)
    return {"adamw vs fused": seconds["optim.AdamW"] / fused, "adamw fused vs fused": seconds["optim.AdamW fused"] / fused}


# ----------------------------------------------------------------------------- 5. peak memory

MEMORY_PROBES = {
    "encoder forward, fixed 64, batch 32": ["ours", "transformers eager", "transformers sdpa"],
    "encoder train step x2, fixed 64, batch 32": [OURS, *REFERENCES],
    "optimizer step x3": list(OPTIMIZERS),
    "SST training, 5 steps of batch 8": ["ours (train.py's path)", "naive (tokenise per batch, pad to 128)"],
}


def resident_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_memory(device):
    """Start a new peak from here; returns the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    return resident_bytes("VmRSS")


def peak_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resident_bytes("VmHWM")


def memory_probe(args, section, contender):
    """Set one contender up, do its work, return the peak memory of the work above the set-up.

    Meant to run in a fresh process per contender: freed memory stays with the process (glibc
    keeps it for reuse; torch's CUDA allocator caches it), so contenders measured one after another
    in one process would hide each other's peaks. On CPU the peak is the resident set (VmHWM,
    reset after set-up through /proc/self/clear_refs): every byte, torch's, Python's, the
    tokenizer's. tracemalloc would miss torch's allocations. The optimizer state is created
    during the work, so it is part of the peak of the training steps and the optimizer steps."""
    checkpoint, device = default_checkpoint_path(), args.device
    if section.startswith("encoder"):
        sst = load_task_data(args.data_dir, "sst", BertTokenizer.from_pretrained(checkpoint), limit=200)
        batches = [{k: v.to(device) for k, v in b.items()} for b in encoder_batches([sst], 32, 1, 64)]
        if " + " not in contender:  # a forward probe: the optimizer is built but never steps
            contender = OURS if contender == "ours" else f"{contender} + torch AdamW default"
        model, optimizer = load_encoder(contender, checkpoint, device)
        if section.startswith("encoder forward"):
            work = lambda: encoder_forward(model.eval(), batches * 2, device)
        else:
            work = lambda: encoder_train_steps(model.train(), optimizer, batches * 2, device)
    elif section.startswith("optimizer"):
        optimizer = make_optimizer(contender, minilm_parameters_with_grads(checkpoint, device))
        work = lambda: [optimizer.step() for _ in range(3)]
    else:
        examples = tasks.read_examples(args.data_dir, "sst", "train", report=lambda _: None)
        if contender.startswith("ours"):  # the token-id cache is part of the set-up (a few MB)
            data = tasks.TaskData("sst", examples, BertTokenizer.from_pretrained(checkpoint), max_length=128)
            step = our_training_steps(data, checkpoint, device)
        else:
            step = naive_training_steps(examples, checkpoint, device)
        work = lambda: [step() for _ in range(5)]
    baseline = reset_peak_memory(device)
    work()
    return peak_memory(device) - baseline


def bench_memory(args):
    if args.device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        print("\n5. memory: skipped, measuring peak RSS needs Linux's /proc/self/clear_refs")
        return
    rows = []
    for section, contenders in MEMORY_PROBES.items():
        for contender in contenders:
            command = [sys.executable, __file__, "--memory_probe", f"{section}:{contender}",
                       "--data_dir", args.data_dir, "--device", args.device.type]
            if args.threads:
                command += ["--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"memory probe {section}:{contender} failed:\n{result.stderr[-2000:]}")
            rows.append([section, contender, json.loads(result.stdout.splitlines()[-1])["peak_bytes"] / 2**20])
    how = ("torch.cuda.max_memory_allocated() minus the set-up's allocation" if args.device.type == "cuda" else
           "peak resident set (VmHWM) minus the set-up's")
    print_table(f"5. peak memory of the work above its set-up (the model and batch; for the optimizer, the "
                f"parameters and gradients), one fresh process per row: {how}", ["work", "contender", "MiB"], rows)


# ----------------------------------------------------------------------------- targets

def print_targets(results):
    rows = []
    for setting, ratios in results.get("encoder", {}).items():
        for what, ratio in ratios.items():
            target = 1.2 if what.startswith("train") else None
            rows.append([f"encoder {what}, {setting}", "faster reference / ours", f"{ratio:.2f}x",
                         ">= 1.20x" if target else "-", ("met" if ratio >= target else "not met") if target else ""])
    if "optimizer" in results:
        for what, key in (("optim.AdamW step", "adamw vs fused"), ("optim.AdamW(fused=True) step", "adamw fused vs fused")):
            ratio = results["optimizer"][key]
            rows.append([what, "ours / torch fused", f"{ratio:.2f}x", "<= 1.50x", "met" if ratio <= 1.5 else "not met"])
    if "epoch" in results:
        for span, ratio in results["epoch"].items():
            rows.append([f"SST training, {span}", "ours / naive", f"{ratio:.2f}x", ">= 3.00x", "met" if ratio >= 3 else "not met"])
    if "tokenizer" in results:
        ratio = results["tokenizer"]["cold vs slow"]
        rows.append(["tokenizer, cold cache", "slow reference / ours", f"{ratio:.2f}x", ">= 1.50x", "met" if ratio >= 1.5 else "not met"])
    if rows:
        print_table("targets (time ratios, > 1 means ours is faster, except the optimizer's)",
                    ["measurement", "ratio", "got", "target", ""], rows)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.memory_probe:
        section, contender = args.memory_probe.split(":", 1)
        print(json.dumps({"peak_bytes": memory_probe(args, section, contender)}))
        return
    checkpoint = default_checkpoint_path()
    print(f"bench.py on {args.device}{' with bf16 autocast' if args.device.type == 'cuda' else ''}: "
          f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"median of {args.rounds} rounds{', --quick' if args.quick else ''}")
    results = {}
    if "encoder" in args.only:
        tokenizer = BertTokenizer.from_pretrained(checkpoint)
        limit = 1000 if args.quick else 4000
        datas = [load_task_data(args.data_dir, task, tokenizer, limit) for task in ("sst", "para")]
        results["encoder"] = bench_encoder(args, datas, checkpoint)
    if "tokenizer" in args.only:
        sentences = [e.text for e in tasks.read_examples(args.data_dir, "sst", "train", report=lambda _: None)]
        results["tokenizer"] = bench_tokenizer(args, sentences[:500] if args.quick else sentences, checkpoint)
    if "epoch" in args.only:
        results["epoch"] = bench_epoch(args, checkpoint)
    if "optimizer" in args.only:
        results["optimizer"] = bench_optimizer(args, checkpoint)
    if "memory" in args.only:
        bench_memory(args)
    print_targets(results)


if __name__ == "__main__":
    main()
