"""Speed of minbert-mtl's hand-written parts against the references: one comparison per table.

    python bench.py                                # every table, torch's default threads
    python bench.py --only optimizer --threads 1   # some tables (a comma list), one thread
    python bench.py --quick                        # tiny sizes, two rounds: checks that it runs

Each table's first row is its reference; x = a row's time / the reference's, same run (< 1: faster).
  encoder    transformers.BertModel (sdpa; eager) vs bert.BertModel, same checkpoint: forward (eval, no
             grad), and a train step (dropout on, a loss on the pooled output, backward and a step of
             torch.optim.AdamW(fused=True) on both sides, so that only the encoders differ), on SST and
             Quora batches as train.py makes them: length-bucketed, 32, padded to the longest.
  tokenizer  transformers' slow tokenizer (pure Python, like ours; and the fast Rust one) vs
             tokenizer.BertTokenizer, word cache cold, on all SST train sentences.
  optimizer  torch.optim.AdamW(fused=True) vs optim.AdamW (eager, and fused=True: torch.compile of the
             same per-tensor update): one step on MiniLM's 22.7M parameters, random gradients.
  data       an SST training step fed by a naive collate_fn (tokenise each batch, pad it to 128) vs
             train.py's data path (ids padded once and held on the device; a batch is rows of them, cut to
             their longest), same examples and model.
             Ours tokenises the training set once up front: the tokenizer table's cold-cache time.
  smart      that step without vs with smart.SmartRegulariser (paper defaults, K = 1).
  step       train.py's own training step (training_step: forward, backward, update) on SST batches, in
             float32 with the eager update (the defaults before bf16) vs bf16 autocast, eager and fused
             update (today's default here), beside a bf16 matmul of the encoder's FFN shape at the same
             token counts: the matmul limit. FLOPs are counted by torch.utils.flop_counter. Where bf16
             is not native (emulated, ~150x slower than float32), float32 with the eager and the fused
             update, beside a float32 matmul.
  epoch      whole runs, one process each: a full SST epoch and its dev pass by transformers' Trainer
             (AutoModelForSequenceClassification, fast tokenizer, DataCollatorWithPadding) at its
             defaults (fp32) and at its best here (group_by_length, with bf16 where bf16 is native), vs
             `train.py --tasks sst --epochs 1` at its defaults; same checkpoint, batch 32, lr 1e-4 falling
             linearly, max length 128, weight decay 0.01, threads. Wall time of the whole process
             (start-up to scores), best of --rounds turns (--rounds 3 is plenty: a round is about five
             minutes on a 2-core CPU with bf16, eleven on one without), and dev accuracy.

Timing: on every batch the contenders take turns, round after round, in one process on the same
threads; a batch's time is its median round (after a warm-up call each); a table shows the mean
over batches. A load spike slows one turn, not one contender, so ratios hold on a shared machine
where absolute times do not. More torch threads than idle cores make every parallel op wait for a
descheduled thread: on a busy machine, use --threads 1.

Memory: beside each row, the peak memory of the contender's work above its set-up (the models,
optimizers and batches), measured in a fresh process per row, since freed memory stays with a
process (glibc keeps it for reuse, torch's CUDA allocator caches it) and contenders measured one
after another would hide each other's peaks: the peak resident set (Linux's VmHWM, reset after
the set-up, once glibc has handed freed pages back with malloc_trim, so that reusing them counts)
over the first two calls on CPU, torch.cuda.max_memory_allocated() on CUDA. So it
holds activations, gradients and the optimizer's state, created at the first step. For whole runs
(the epoch table) it is the process's own peak resident set, everything included.
"""
import argparse
import ctypes
import functools
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import losses
import optim
import samplers
import smart
import tasks
import train
from bert import BertModel, default_checkpoint_path
from tokenizer import BertTokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="../shared/data", help="folder with the CS224N task files")
    p.add_argument("--quick", action="store_true", help="tiny sizes and two rounds: checks that it runs")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per batch (default 5, --quick 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_memory", action="store_true", help="leave out the peak-memory column (a process per row)")
    p.add_argument("--memory_probe", default=None, help=argparse.SUPPRESS)  # internal: see `peak_memory_of`
    p.add_argument("--trainer_epoch", choices=["defaults", "best"], default=None, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if any(n is not None and n < 1 for n in (args.threads, args.rounds)):
        p.error("--threads and --rounds must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.device = torch.device(args.device)
    args.rounds = args.rounds or (2 if args.quick else 5)
    # batch size, batches per table, examples read per task (None: the whole training file)
    args.batch_size, args.n_batches, args.limit = (8, 2, 1000) if args.quick else (32, 8, None)
    return args


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":  # CUDA calls return before the work is done
        torch.cuda.synchronize()


def time_in_turns(contenders, items, rounds, device, warm_up=True, pick=statistics.median):
    """{name: seconds} for contenders {name: fn(item)}: on each item the contenders take turns,
    round after round; an item's time is its median round (or `pick` of them), and the result the
    mean over items."""
    if warm_up:  # lazy set-up, optimizer state, compiled kernels
        for fn in contenders.values():
            fn(items[0])
    total = dict.fromkeys(contenders, 0.0)
    for item in items:
        rounds_seconds = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                sync(device)
                start = time.perf_counter()
                fn(item)
                sync(device)
                rounds_seconds[name].append(time.perf_counter() - start)
        for name, seconds in rounds_seconds.items():
            total[name] += pick(seconds)
    return {name: seconds / len(items) for name, seconds in total.items()}


def print_table(title, seconds, per, columns=None):
    """The first contender is the reference: x = a row's time / its time. `columns`: more
    {header: {contender: text}} to print on the right."""
    columns = columns or {}
    reference, width = seconds[next(iter(seconds))], max(map(len, seconds))
    heads = "".join(f"  {header:>{max(len(header), 8)}}" for header in columns)
    print(f"\n{title}\n  {'contender':<{width}}  {'ms/' + per:>10}  {'x':>6}{heads}")
    for name, s in seconds.items():
        cells = "".join(f"  {column.get(name, ''):>{max(len(header), 8)}}" for header, column in columns.items())
        print(f"  {name:<{width}}  {s * 1e3:10.1f}  {s / reference:5.2f}x{cells}")


def run_table(args, section, title, contenders, items, per, rounds=None, columns=None, flops=None):
    """Time a table's contenders in turns and print it with their peak memory; as a memory probe
    (`--memory_probe section:table number:contender`) measure that one contender instead, and exit.
    `flops` ({name: mean FLOPs per item}) adds each row's TFLOP/s and its share of the last row's."""
    if args.memory_probe is not None:
        probe_section, number, name = args.memory_probe.split(":", 2)
        if (probe_section, number) == (section, title.split(".")[0]):
            print(json.dumps({"peak_bytes": peak_memory_of(contenders[name], items[0], args.device)}))
            sys.exit(0)
        return
    seconds = time_in_turns(contenders, items, rounds or args.rounds, args.device)
    if flops:
        rate = {name: flops[name] / seconds[name] for name in flops}
        limit = rate[list(flops)[-1]]
        columns = {"TFLOP/s": {name: f"{r / 1e12:.3f}" for name, r in rate.items()},
                   "of the last": {name: f"{r / limit:.0%}" for name, r in rate.items()}}
    if not args.no_memory:
        columns = {**(columns or {}), "peak MiB": {name: f"{peak_memory_in_a_fresh_process(args, section, title, name):.0f}"
                                                   for name in contenders}}
    print_table(title, seconds, per, columns)
    return seconds


# ----------------------------------------------------------------------------- memory

def resident_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory_of(fn, item, device):
    """Peak memory of fn's first two calls above what was in use before them (see the docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL(None).malloc_trim(0)  # glibc returns the set-up's freed pages: reusing them counts again
        with open("/proc/self/clear_refs", "w") as f:  # "5": the peak resident set (VmHWM) restarts from here
            f.write("5")
        before = resident_bytes("VmRSS")
    fn(item)
    fn(item)
    sync(device)
    return (torch.cuda.max_memory_allocated() if device.type == "cuda" else resident_bytes("VmHWM")) - before


def peak_memory_in_a_fresh_process(args, section, title, name):
    """MiB: this bench.py again, with the same flags, set up for this one section and measuring `name`."""
    command = [sys.executable, __file__, "--only", section, "--data_dir", args.data_dir, "--device", args.device.type,
               "--memory_probe", f"{section}:{title.split('.')[0]}:{name}"]
    command += ["--quick"] if args.quick else []
    command += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {name!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])["peak_bytes"] / 2**20


def wait_for_peak_memory(process, every=0.05):
    """Wait for `process` to end; its exit status and peak resident set (MiB), read from its own
    /proc/<pid>/status (VmHWM) while it runs: that one process's, not its children's (the
    compiler's workers, say). Not wait4's ru_maxrss: Linux carries the forking parent's peak
    across exec into the child's ru_maxrss, so a child of a bench.py that holds models would
    count them (`python -c pass` forked from a 1.5 GiB parent: 1514 MiB)."""
    peak = 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")])
        except OSError:  # it ended between the poll and the read
            pass
        time.sleep(every)
    return process.returncode, peak


# ----------------------------------------------------------------------------- real batches

@functools.cache
def task_data(data_dir, task, limit=None, device=torch.device("cpu")):
    """The first `limit` training examples of a task, tokenised once and held on `device`, as
    train.py does."""
    examples = tasks.read_examples(data_dir, task, "train", report=lambda _: None)[:limit]
    return tasks.TaskData(task, examples, BertTokenizer.from_pretrained(default_checkpoint_path()), 128, device=device)


def bucketed_indices(data, batch_size, n_batches, seed=0):
    """The first n_batches full batches of train.py's batching (samplers.length_bucketed_batches)."""
    batches = samplers.length_bucketed_batches(data.lengths, batch_size, random.Random(seed))
    return [b for b in batches if len(b) == batch_size][:n_batches]


def encoder_batches(datas, batch_size, n_batches):
    """n_batches encoder inputs, taken in turn from each TaskData's bucketed batches."""
    per_task = [[d.batch(b)["inputs"][0] for b in bucketed_indices(d, batch_size, n_batches)] for d in datas]
    return [batch for turn in zip(*per_task) for batch in turn][:n_batches]


def naive_collate(examples, tokenizer, length=128, device=torch.device("cpu")):
    """A first DataLoader collate_fn: tokenise the batch's texts now, pad every batch to `length`,
    copy it to the device (from pinned memory on CUDA, as DataLoader(pin_memory=True) would)."""
    inputs = tokenizer([e.text for e in examples], max_length=length)  # padded below with 0: pad id, type, mask
    inputs = {k: tasks.to_device(F.pad(v, (0, length - v.shape[1]), value=0), device) for k, v in inputs.items()}
    return {"inputs": [inputs], "labels": tasks.to_device(torch.tensor([e.label for e in examples]), device)}


# ----------------------------------------------------------------------------- the tables

def bench_encoder(args):
    checkpoint, device = default_checkpoint_path(), args.device
    datas = [task_data(args.data_dir, task, args.limit) for task in ("sst", "para")]
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in encoder_batches(datas, args.batch_size, args.n_batches)]
    reference = lambda attention: transformers.BertModel.from_pretrained(str(checkpoint), attn_implementation=attention)
    models = {"transformers sdpa": reference("sdpa"), "ours": BertModel.from_pretrained(checkpoint),
              "transformers eager": reference("eager")}
    models = {name: model.to(device) for name, model in models.items()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True) for name, model in models.items()}

    @torch.no_grad()
    def forward(name, batch):
        models[name](**batch)

    def train_step(name, batch):
        optimizers[name].zero_grad(set_to_none=True)
        models[name](**batch)["pooler_output"].square().mean().backward()
        optimizers[name].step()

    for model in models.values():
        model.eval()
    run_table(args, "encoder", f"1a. encoder forward, bucketed SST/Quora batches of {args.batch_size}, eval mode",
              {name: functools.partial(forward, name) for name in models}, batches, "batch")
    for model in models.values():
        model.train()  # dropout on, as in training
    run_table(args, "encoder", "1b. encoder train step (forward, backward, torch fused AdamW), same batches",
              {name: functools.partial(train_step, name) for name in models}, batches, "batch")


def bench_tokenizer(args):
    checkpoint = default_checkpoint_path()
    sentences = [e.text for e in task_data(args.data_dir, "sst", args.limit).examples]
    vocab = BertTokenizer.from_pretrained(checkpoint).vocab
    slow = transformers.BertTokenizerLegacy.from_pretrained(str(checkpoint))
    fast = transformers.BertTokenizerFast.from_pretrained(str(checkpoint))

    def ours_cold(texts):  # a new tokenizer, so its word cache starts empty, as TaskData's does
        tokenizer = BertTokenizer(vocab)
        return [tokenizer.encode(t) for t in texts]

    run_table(args, "tokenizer",
              f"2. tokenizer, text -> ids with [CLS]/[SEP], {len(sentences)} SST train sentences one at a time",
              {"transformers slow": lambda texts: [slow.encode(t) for t in texts], "ours, cold cache": ours_cold,
               "transformers fast": lambda texts: [fast.encode(t) for t in texts]}, [sentences], "pass")


def minilm_parameters_with_grads(device):
    model = BertModel.from_pretrained(default_checkpoint_path())
    params = [p.detach().to(device).requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def bench_optimizer(args):
    params = minilm_parameters_with_grads  # a copy per optimizer: none steps another's parameters
    optimizers = {"torch AdamW fused": torch.optim.AdamW(params(args.device), lr=1e-5, fused=True),
                  "optim.AdamW": optim.AdamW(params(args.device), lr=1e-5, fused=False),
                  "optim.AdamW fused=True": optim.AdamW(params(args.device), lr=1e-5, fused=True)}
    n_params = sum(p.numel() for p in optimizers["optim.AdamW"].param_groups[0]["params"])
    run_table(args, "optimizer", f"3. optimizer step on all-MiniLM-L6-v2's {n_params / 1e6:.1f}M parameters, "
              "random gradients", {name: lambda _, o=o: o.step() for name, o in optimizers.items()},
              list(range(args.n_batches)), "step", rounds=2 * args.rounds)  # steps are short: more rounds


def sst_model_and_optimizer(args):
    torch.manual_seed(0)
    model = tasks.MultitaskBert(BertModel.from_pretrained(default_checkpoint_path()), ["sst"], dropout=0.1)
    model.to(args.device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def sst_step(model, optimizer, batch, regulariser=None):
    """train.py's step on one SST batch: cross-entropy (+ SMART's term), backward, step (+ teacher)."""
    train.zero_gradients(optimizer, model.encoder.word_table)
    loss = losses.cross_entropy_loss(model("sst", batch["inputs"]), batch["labels"])
    if regulariser is not None:
        loss = loss + regulariser({"sst": batch})
    loss.backward()
    optimizer.step()
    if regulariser is not None:
        regulariser.update_teacher()


def bench_data(args):
    data = task_data(args.data_dir, "sst", args.limit, args.device)
    tokenizer = BertTokenizer.from_pretrained(default_checkpoint_path())
    model, optimizer = sst_model_and_optimizer(args)
    naive_batch = lambda indices: naive_collate([data.examples[i] for i in indices], tokenizer, device=args.device)
    run_table(  # each batch is made inside the timing: how it is made is all that differs
        args, "data", f"4. data path: an SST training step on the same examples, {args.batch_size} a batch",
        {"naive (tokenise per batch, pad to 128)": lambda indices: sst_step(model, optimizer, naive_batch(indices)),
         "ours (ids padded once, on the device; a batch is its rows)": lambda indices: sst_step(model, optimizer, data.batch(indices))},
        bucketed_indices(data, args.batch_size, args.n_batches), "step")


def bench_smart(args):
    data = task_data(args.data_dir, "sst", args.limit, args.device)
    batches = [data.batch(indices) for indices in bucketed_indices(data, args.batch_size, args.n_batches)]
    model, optimizer = sst_model_and_optimizer(args)
    regulariser = smart.SmartRegulariser(model)  # paper defaults; after model.to(device): the teacher is a copy
    run_table(args, "smart", f"5. SMART's cost: an SST training step, bucketed batches of {args.batch_size}",
              {"without SMART": lambda batch: sst_step(model, optimizer, batch),
               "with SMART (K = 1)": lambda batch: sst_step(model, optimizer, batch, regulariser)}, batches, "step")


def train_py_step(args, flags):
    """train.py's own training_step on SST, set up as `train.py --tasks sst <flags>` sets it up."""
    run_args = train.parse_args(["--tasks", "sst", "--batch_size", str(args.batch_size), *flags])
    model = train.build_model(run_args, default_checkpoint_path(), args.device)
    model.train()
    optimizer = train.build_optimizer(run_args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda batch: train.training_step(run_args, model, optimizer, None, params,
                                             {"sst": batch}, {"sst": 1.0}, args.device)


def counted_flops(fn, item):
    """FLOPs of fn(item) as torch.utils.flop_counter counts them: the matmuls, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn(item)
    return counter.get_total_flops()


def bench_step(args):
    torch.manual_seed(0)
    data = task_data(args.data_dir, "sst", args.limit, args.device)
    batches = [data.batch(indices) for indices in bucketed_indices(data, args.batch_size, args.n_batches)]
    precision = train.native_precision(args.device)  # what --precision auto picks here
    if precision == "bf16":
        dtype, steps = torch.bfloat16, {
            "fp32, eager update (the defaults before)": ["--precision", "fp32", "--no-fused_optimizer"],
            "bf16 autocast, eager update": ["--precision", "bf16", "--no-fused_optimizer"],
            "bf16 autocast, fused update (train.py's default)": ["--precision", "bf16", "--fused_optimizer"]}
    else:  # emulated bf16 would be timed in minutes a step: float32 is train.py's default here
        dtype, steps = torch.float32, {
            "fp32, eager update": ["--precision", "fp32", "--no-fused_optimizer"],
            "fp32, fused update (train.py's default here)": ["--precision", "fp32", "--fused_optimizer"]}
    contenders = {name: train_py_step(args, flags) for name, flags in steps.items()}
    hidden, inner = 384, 1536  # all-MiniLM-L6-v2's FFN: (tokens x 384) @ (384 x 1536), its largest matmul
    weight = torch.randn(hidden, inner, dtype=dtype, device=args.device)
    activations = {id(b): torch.randn(b["inputs"][0]["input_ids"].numel(), hidden, dtype=dtype,
                                      device=args.device) for b in batches}
    matmul = f"{precision} matmul of the FFN's shape, same tokens (the limit)"
    contenders[matmul] = lambda batch: activations[id(batch)] @ weight
    counted = train_py_step(args, ["--precision", "fp32", "--no-fused_optimizer"])  # not a contender: it steps
    step_flops = statistics.mean(counted_flops(counted, b) for b in batches)
    flops = {**dict.fromkeys(steps, step_flops),
             matmul: statistics.mean(2 * activations[id(b)].shape[0] * hidden * inner for b in batches)}
    tokens = statistics.mean(b["inputs"][0]["input_ids"].numel() for b in batches)
    run_table(args, "step", f"6. train.py's training step, bucketed SST batches of {args.batch_size} "
              f"({tokens:.0f} token positions a batch, padding included), beside a {precision} matmul", contenders, batches,
              "step", flops=flops)


def trainer_epoch(args):
    """One SST epoch and its dev pass by transformers' Trainer, as a user would set it up; prints
    {"dev_acc": ...}. Runs in a process of its own (the epoch table's contender)."""
    import numpy as np
    transformers.logging.set_verbosity_error()
    checkpoint, best = str(default_checkpoint_path()), args.trainer_epoch == "best"
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)  # the fast one
    limit = 64 if args.quick else None

    def dataset(split):
        examples = tasks.read_examples(args.data_dir, "sst", split, report=lambda _: None)[:limit]
        encoded = tokenizer([e.text for e in examples], truncation=True, max_length=128)
        return [{"input_ids": ids, "attention_mask": mask, "labels": e.label}
                for ids, mask, e in zip(encoded["input_ids"], encoded["attention_mask"], examples)]

    train_set, dev_set = dataset("train"), dataset("dev")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=5)
    with tempfile.TemporaryDirectory() as out_dir:
        settings = transformers.TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=32, per_device_eval_batch_size=64, num_train_epochs=1,
            learning_rate=1e-4, lr_scheduler_type="linear", weight_decay=0.01, seed=11711, save_strategy="no",
            logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=args.device.type == "cpu",
            bf16=best and train.native_precision(args.device) == "bf16",
            train_sampling_strategy="group_by_length" if best else "random")
        trainer = transformers.Trainer(model=model, args=settings, train_dataset=train_set,
                                       data_collator=transformers.DataCollatorWithPadding(tokenizer))
        trainer.train()
        predicted = trainer.predict(dev_set)
    accuracy = float((np.argmax(predicted.predictions, axis=-1) == predicted.label_ids).mean())
    print(json.dumps({"dev_acc": accuracy}))


def bench_epoch(args):
    """Whole runs in processes of their own: wall time from start to scores, dev accuracy, peak RSS."""
    results = {}  # name -> [(dev accuracy, peak MiB)], a pair per round

    def whole_run(name, command, accuracy_of):
        def run(_):
            with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "stdout", "w+") as stdout:
                process = subprocess.Popen(command(tmp), cwd=Path(__file__).parent, stdout=stdout,
                                           stderr=subprocess.DEVNULL)
                status, peak_mib = wait_for_peak_memory(process)
                if status != 0:
                    raise RuntimeError(f"{name}: {shlex.join(command(tmp))} failed")
                stdout.seek(0)
                results.setdefault(name, []).append((accuracy_of(stdout.read(), tmp), peak_mib))
        return run

    here = [sys.executable, __file__, "--data_dir", args.data_dir, "--device", args.device.type]
    here += ["--quick"] if args.quick else []
    trainer = lambda precision: lambda tmp: [*here, "--trainer_epoch", precision]
    from_stdout = lambda stdout, tmp: json.loads(stdout.splitlines()[-1])["dev_acc"]
    limits = ["--limit", "64", "--eval_limit", "64"] if args.quick else []
    ours = lambda tmp: [sys.executable, "train.py", "--tasks", "sst", "--epochs", "1", "--data_dir", args.data_dir,
                        "--device", args.device.type, "--out_dir", str(Path(tmp) / "run"), *limits]
    from_scores = lambda stdout, tmp: json.loads((Path(tmp) / "run" / "scores.json").read_text())["dev"]["sst"]
    best = f"Trainer at its best here ({train.native_precision(args.device)}, group_by_length)"
    contenders = {"Trainer, its defaults (fp32)": whole_run("Trainer defaults", trainer("defaults"), from_stdout),
                  best: whole_run("Trainer best", trainer("best"), from_stdout),
                  "train.py --tasks sst --epochs 1 (its defaults)": whole_run("train.py", ours, from_scores)}
    names = dict(zip(["Trainer defaults", "Trainer best", "train.py"], contenders))
    seconds = time_in_turns(contenders, [None], args.rounds, args.device, warm_up=False, pick=min)
    runs = {names[key]: rounds for key, rounds in results.items()}
    columns = {"dev acc": {name: " ".join(f"{acc:.3f}" for acc, _ in rounds) for name, rounds in runs.items()},
               "peak MiB": {name: f"{max(mib for _, mib in rounds):.0f}" for name, rounds in runs.items()}}
    print_table(f"7. a whole SST epoch and its dev pass, one process each, best of {args.rounds} turns "
                "(dev accuracy of each turn)", seconds, "run", columns)


# one table per entry: a new comparison is a function here and a line in this dict
SECTIONS = {"encoder": bench_encoder, "tokenizer": bench_tokenizer, "optimizer": bench_optimizer,
            "data": bench_data, "smart": bench_smart, "step": bench_step, "epoch": bench_epoch}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.trainer_epoch:
        return trainer_epoch(args)
    if args.memory_probe is None:
        print(f"bench.py on {args.device}, {torch.get_num_threads()} torch threads (OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs), torch {torch.__version__}, "
              f"transformers {transformers.__version__}, median of {args.rounds} rounds{', --quick' if args.quick else ''}")
    for section in args.only:
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
