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
             train.py's data path (ids cached once, padded to the longest), same examples and model.
             Ours tokenises the training set once up front: the tokenizer table's cold-cache time.
  smart      that step without vs with smart.SmartRegulariser (paper defaults, K = 1).

Timing: on every batch the contenders take turns, round after round, in one process on the same
threads; a batch's time is its median round (after a warm-up call each); a table shows the mean
over batches. A load spike slows one turn, not one contender, so ratios hold on a shared machine
where absolute times do not. More torch threads than idle cores make every parallel op wait for a
descheduled thread: on a busy machine, use --threads 1.
"""
import argparse
import functools
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

import losses
import optim
import samplers
import smart
import tasks
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


def time_in_turns(contenders, items, rounds, device):
    """{name: seconds} for contenders {name: fn(item)}: on each item the contenders take turns,
    round after round; an item's time is its median round, and the result the mean over items."""
    for fn in contenders.values():  # warm-up: lazy set-up, optimizer state, compiled kernels
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
            total[name] += statistics.median(seconds)
    return {name: seconds / len(items) for name, seconds in total.items()}


def print_table(title, seconds, per):
    """The first contender is the reference: x = a row's time / its time."""
    reference, width = seconds[next(iter(seconds))], max(map(len, seconds))
    print(f"\n{title}\n  {'contender':<{width}}  {'ms/' + per:>10}  {'x':>6}")
    for name, s in seconds.items():
        print(f"  {name:<{width}}  {s * 1e3:10.1f}  {s / reference:5.2f}x")


# ----------------------------------------------------------------------------- real batches

@functools.cache
def task_data(data_dir, task, limit=None):
    """The first `limit` training examples of a task, tokenised once as train.py does."""
    examples = tasks.read_examples(data_dir, task, "train", report=lambda _: None)[:limit]
    return tasks.TaskData(task, examples, BertTokenizer.from_pretrained(default_checkpoint_path()), 128)


def bucketed_indices(data, batch_size, n_batches, seed=0):
    """The first n_batches full batches of train.py's batching (samplers.length_bucketed_batches)."""
    batches = samplers.length_bucketed_batches(data.lengths, batch_size, random.Random(seed))
    return [b for b in batches if len(b) == batch_size][:n_batches]


def encoder_batches(datas, batch_size, n_batches):
    """n_batches encoder inputs, taken in turn from each TaskData's bucketed batches."""
    per_task = [[d.batch(b)["inputs"][0] for b in bucketed_indices(d, batch_size, n_batches)] for d in datas]
    return [batch for turn in zip(*per_task) for batch in turn][:n_batches]


def naive_collate(examples, tokenizer, length=128):
    """A first DataLoader collate_fn: tokenise the batch's texts now, pad every batch to `length`."""
    inputs = tokenizer([e.text for e in examples], max_length=length)
    inputs = {k: F.pad(v, (0, length - v.shape[1]), value=0) for k, v in inputs.items()}  # pad id, type, mask: 0
    return {"inputs": [inputs], "labels": torch.tensor([e.label for e in examples])}


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
    seconds = time_in_turns({name: functools.partial(forward, name) for name in models}, batches, args.rounds, device)
    print_table(f"1a. encoder forward, bucketed SST/Quora batches of {args.batch_size}, eval mode", seconds, "batch")
    for model in models.values():
        model.train()  # dropout on, as in training
    seconds = time_in_turns({name: functools.partial(train_step, name) for name in models}, batches, args.rounds,
                            device)
    print_table("1b. encoder train step (forward, backward, torch fused AdamW), same batches", seconds, "batch")


def bench_tokenizer(args):
    checkpoint = default_checkpoint_path()
    sentences = [e.text for e in task_data(args.data_dir, "sst", args.limit).examples]
    vocab = BertTokenizer.from_pretrained(checkpoint).vocab
    slow = transformers.BertTokenizerLegacy.from_pretrained(str(checkpoint))
    fast = transformers.BertTokenizerFast.from_pretrained(str(checkpoint))

    def ours_cold(texts):  # a new tokenizer, so its word cache starts empty, as TaskData's does
        tokenizer = BertTokenizer(vocab)
        return [tokenizer.encode(t) for t in texts]

    seconds = time_in_turns({"transformers slow": lambda texts: [slow.encode(t) for t in texts],
                             "ours, cold cache": ours_cold,
                             "transformers fast": lambda texts: [fast.encode(t) for t in texts]},
                            [sentences], args.rounds, torch.device("cpu"))
    print_table(f"2. tokenizer, text -> ids with [CLS]/[SEP], {len(sentences)} SST train sentences one at a time",
                seconds, "pass")


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
    seconds = time_in_turns({name: lambda _, o=o: o.step() for name, o in optimizers.items()},
                            range(args.n_batches), 2 * args.rounds, args.device)  # steps are short: more rounds
    print_table(f"3. optimizer step on all-MiniLM-L6-v2's {n_params / 1e6:.1f}M parameters, random gradients",
                seconds, "step")


def sst_model_and_optimizer(args):
    torch.manual_seed(0)
    model = tasks.MultitaskBert(BertModel.from_pretrained(default_checkpoint_path()), ["sst"], dropout=0.1)
    model.to(args.device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def sst_step(model, optimizer, batch, regulariser=None):
    """train.py's step on one SST batch: cross-entropy (+ SMART's term), backward, step (+ teacher)."""
    batch = tasks.move_batch(batch, next(model.parameters()).device)  # as train.py does, every step
    optimizer.zero_grad(set_to_none=True)
    loss = losses.cross_entropy_loss(model("sst", batch["inputs"]), batch["labels"])
    if regulariser is not None:
        loss = loss + regulariser({"sst": batch})
    loss.backward()
    optimizer.step()
    if regulariser is not None:
        regulariser.update_teacher()


def bench_data(args):
    data = task_data(args.data_dir, "sst", args.limit)
    tokenizer = BertTokenizer.from_pretrained(default_checkpoint_path())
    model, optimizer = sst_model_and_optimizer(args)
    naive_batch = lambda indices: naive_collate([data.examples[i] for i in indices], tokenizer)
    seconds = time_in_turns(  # each batch is made inside the timing: how it is made is all that differs
        {"naive (tokenise per batch, pad to 128)": lambda indices: sst_step(model, optimizer, naive_batch(indices)),
         "ours (ids cached, padded to the longest)": lambda indices: sst_step(model, optimizer, data.batch(indices))},
        bucketed_indices(data, args.batch_size, args.n_batches), args.rounds, args.device)
    print_table(f"4. data path: an SST training step on the same examples, {args.batch_size} a batch", seconds, "step")


def bench_smart(args):
    data = task_data(args.data_dir, "sst", args.limit)
    batches = [data.batch(indices) for indices in bucketed_indices(data, args.batch_size, args.n_batches)]
    model, optimizer = sst_model_and_optimizer(args)
    regulariser = smart.SmartRegulariser(model)  # paper defaults; after model.to(device): the teacher is a copy
    seconds = time_in_turns({"without SMART": lambda batch: sst_step(model, optimizer, batch),
                             "with SMART (K = 1)": lambda batch: sst_step(model, optimizer, batch, regulariser)},
                            batches, args.rounds, args.device)
    print_table(f"5. SMART's cost: an SST training step, bucketed batches of {args.batch_size}", seconds, "step")


# one table per entry: a new comparison is a function here and a line in this dict
SECTIONS = {"encoder": bench_encoder, "tokenizer": bench_tokenizer, "optimizer": bench_optimizer,
            "data": bench_data, "smart": bench_smart}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"bench.py on {args.device}, {torch.get_num_threads()} torch threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, median of {args.rounds} rounds{', --quick' if args.quick else ''}")
    for section in args.only:
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
