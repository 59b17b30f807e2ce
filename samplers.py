"""Multi-task samplers: which task batches go into each training step of an epoch.

A training step is a dict {task_name: batch}; train.py computes each task's loss on its batch and
combines them (losses.combine_losses). The samplers know nothing of data: each task is a function
make_batches(rng) -> list that returns a freshly shuffled list of batches for one pass over that
task's data (a batch is opaque here; in practice a list of example indices). All randomness comes
from the one random.Random passed in, so a seed fixes the whole plan. Task order is the dict's
insertion order.

The strategies compared in the "multi-task BERT" study (CS224N 2023 default project style):
    sequential   every batch of the first task, then of the second, ...; one task per step.
                 Steps = sum_t n_t. The baseline: the later tasks can overwrite the earlier.
    break        one batch of every task per step; the epoch ends when any task runs out.
                 Steps = min_t n_t, so most of a large task (Quora) is never seen.
    roundrobin   one batch of every task per step; a smaller task that runs out restarts with a
                 fresh shuffle, until the largest task has been used once. Steps = max_t n_t.
and one beyond the study:
    proportional one task per step, drawn with probability n_t^alpha / sum_s n_s^alpha, where n_t
                 is task t's number of batches (alpha = 1: proportional to size, alpha = 0:
                 uniform; "temperature" sampling with alpha = 1/T, as in Raffel et al. 2020, T5).
                 Steps = sum_t n_t; a task that runs out restarts with a fresh shuffle.

Each sampler returns the whole epoch's plan as a list, not a generator: train.py rebuilds the same
plan from the same seed to resume mid-epoch by skipping its first k steps, and knows the total for
a progress bar. The plan holds only batch handles (index lists), so it is small.

Also here: length_bucketed_batches, the batching the data pipeline uses for each task.
"""
SAMPLERS = ("sequential", "break", "roundrobin", "proportional")


def _first_passes(task_batches, rng):
    """One freshly shuffled pass over every task, in the dict's order; refuses empty tasks."""
    if not task_batches:
        raise ValueError("no tasks to sample from; pass at least one {task_name: make_batches}")
    passes = {}
    for task, make_batches in task_batches.items():
        passes[task] = list(make_batches(rng))
        if not passes[task]:
            raise ValueError(f"task {task!r} has no batches; check its data file and batch size")
    return passes


def _endless_batches(task, first_pass, make_batches, rng):
    """One task's batches, pass after pass: a freshly shuffled pass when the last runs out."""
    batches = first_pass
    while batches:
        yield from batches
        batches = list(make_batches(rng))
    raise ValueError(f"task {task!r} returned no batches on a later pass; make_batches must "
                     "return the same batches each pass")


def sequential_steps(task_batches, rng):
    """Every batch of the first task, then every batch of the second, ...; one task per step."""
    passes = _first_passes(task_batches, rng)
    return [{task: batch} for task, batches in passes.items() for batch in batches]


def break_steps(task_batches, rng):
    """One batch of every task per step, until the smallest task runs out (min_t n_t steps)."""
    passes = _first_passes(task_batches, rng)
    n_steps = min(len(batches) for batches in passes.values())
    return [{task: batches[step] for task, batches in passes.items()} for step in range(n_steps)]


def roundrobin_steps(task_batches, rng):
    """One batch of every task per step, until the largest task has been used once (max_t n_t
    steps); a smaller task that runs out restarts with a fresh shuffle."""
    passes = _first_passes(task_batches, rng)
    n_steps = max(len(batches) for batches in passes.values())
    streams = {task: _endless_batches(task, passes[task], task_batches[task], rng)
               for task in passes}
    return [{task: next(stream) for task, stream in streams.items()}
            for _ in range(n_steps)]


def proportional_steps(task_batches, rng, alpha=1.0):
    """One task per step, drawn with probability n_t^alpha / sum_s n_s^alpha (n_t = task t's
    number of batches), for sum_t n_t steps; a task that runs out restarts with a fresh shuffle."""
    passes = _first_passes(task_batches, rng)
    tasks = list(passes)
    weights = [len(passes[task]) ** alpha for task in tasks]
    streams = {task: _endless_batches(task, passes[task], task_batches[task], rng)
               for task in tasks}
    n_steps = sum(len(batches) for batches in passes.values())
    drawn_tasks = rng.choices(tasks, weights=weights, k=n_steps)
    return [{task: next(streams[task])} for task in drawn_tasks]


def make_plan(sampler, task_batches, rng, alpha=1.0):
    """The epoch's list of steps for the sampler named `sampler` (one of SAMPLERS)."""
    if sampler == "sequential":
        return sequential_steps(task_batches, rng)
    if sampler == "break":
        return break_steps(task_batches, rng)
    if sampler == "roundrobin":
        return roundrobin_steps(task_batches, rng)
    if sampler == "proportional":
        return proportional_steps(task_batches, rng, alpha)
    raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------------------------------------
# Batching one task's examples

def length_bucketed_batches(lengths, batch_size, rng, bucket_size_in_batches=50):
    """Random batches of example indices whose examples have similar lengths.

    Why: a batch is padded to its longest example, so a batch mixing a 5-token and a 60-token
    sentence spends most of its compute on padding. Sorting the whole data set by length would
    remove the padding but give the same batches every epoch, ordered short to long. Instead:
    shuffle the indices, cut them into chunks of batch_size * bucket_size_in_batches, sort each
    chunk by length, cut it into batches, then shuffle the order of all batches. Each batch then
    holds examples of nearly equal length, yet which examples meet, and in what order the batches
    come, change every epoch.

    Every index 0..len(lengths)-1 appears exactly once. All batches have batch_size indices except
    possibly one (the tail of the last chunk), which is smaller and may land anywhere in the order.
    bucket_size_in_batches=1 is plain random batching.
    """
    if batch_size < 1 or bucket_size_in_batches < 1:
        raise ValueError(f"batch_size ({batch_size}) and bucket_size_in_batches "
                         f"({bucket_size_in_batches}) must both be at least 1")
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    chunk_size = batch_size * bucket_size_in_batches
    batches = []
    for chunk_start in range(0, len(indices), chunk_size):
        chunk = sorted(indices[chunk_start:chunk_start + chunk_size], key=lambda i: lengths[i])
        batches += [chunk[start:start + batch_size] for start in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
