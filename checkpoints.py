"""A run's files, and how a run stopped at any moment goes on as if it never stopped.

What train.py keeps in --out_dir: args.json; metrics.jsonl, a line per finished epoch; best.pt,
the model of the best epoch by the overall dev score, with that epoch's dev scores and
predictions; last.pt, everything a resumed run needs (`save_resumable`); with --teachers,
teachers.pt, the targets the teachers predicted; at the end predictions/ and scores.json.

Writes are atomic: each file goes to a temporary file first, then a rename puts it in place, so
a crash (or a kill) at any moment leaves either the old file or the new one, never half of one.
A new run saves last.pt before its first step; at the end of an epoch best.pt (when the epoch is
the best so far), then last.pt; --save_every N also saves last.pt every N steps of an epoch.

A resumed run (`resume`) ends with the same weights, bit for bit on the same CPU, as a run never
stopped, because last.pt holds all the state a step depends on:

    the weights, the optimizer's moments and step counts, SMART's teacher weights,
    the random-number state of every rank (dropout masks and SMART's noise),
    the progress (train.new_progress): epochs done and steps of the current epoch done, the
    epoch's loss so far, the skipped steps, the best score and its epoch, every epoch's record,
    and the run's flags.

The epoch's batches are not saved: train.py rebuilds its plan from (seed, epoch), and the
learning rate is a function of the position. A resumed run takes its flags from last.pt
(train.flags_of_the_run: only those that change nothing it learns may be given anew), and
rewrites metrics.jsonl from the history there: killed between last.pt and metrics.jsonl, a run
left the latter an epoch short. Killed after best.pt but before last.pt, a resumed run retrains
that epoch and writes the same best.pt again (on the same machine; on another device or number
of ranks it may differ).

Checkpoints load with weights_only=True: a checkpoint is data, and unpickling anything else from
a file could run code. A file that cannot be read, or does not fit the model, is a CheckpointError
with one line that says which file and why.
"""
import json
import os
from pathlib import Path

import torch

import distributed
from bert import CheckpointError


def write_atomically(path, text):
    """Write to a temporary file, then rename: a crash never leaves half a file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_atomically(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_metrics(out_dir, history):
    """metrics.jsonl, one line per finished epoch, rewritten whole from `history`."""
    write_atomically(out_dir / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))


def read_metrics(out_dir):
    """The records of <out_dir>/metrics.jsonl, one per finished epoch ([] before the first)."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def load_checkpoint(path, mmap=False):
    """A best.pt, last.pt or teachers.pt as saved (tensors, numbers, strings, dicts), on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None


def load_model_state(path, model):
    """The model weights of the checkpoint at `path`, checked to fit `model`."""
    return checked_model_state(path, load_checkpoint(path), model)


def checked_model_state(path, state, model):
    """The model weights in a best.pt or last.pt `state`, if they fit `model` exactly."""
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path}: not a model checkpoint (best.pt or last.pt from train.py)")
    expected = model.state_dict()
    for kind, names in (("missing", set(expected) - set(state)), ("unexpected", set(state) - set(expected))):
        if names:
            raise CheckpointError(f"{path}: does not fit this model ({kind} {sorted(names)[0]!r}; check --tasks)")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(f"{path}: {name!r} has shape {tuple(state[name].shape)}, this model's "
                                  f"{tuple(tensor.shape)} (check --bert)")
    return state


def rng_states(device):
    """This process's random-number states: torch's CPU generator, and the GPU's on CUDA."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def save_resumable(path, args, model, optimizer, regulariser, progress, device):
    """last.pt. Every rank calls it (each rank's RNG states are gathered: its dropout masks are its
    own); rank 0 writes. The ranks' weights, optimizer and SMART states are the same: rank 0's are saved."""
    ranks_rng = distributed.gathered(rng_states(device))
    if distributed.RANK != 0:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress,
             "args": vars(args), "ranks_rng": ranks_rng}
    if regulariser is not None:
        state["smart"] = regulariser.state_dict()
    save_atomically(state, path)


def resume(path, model, optimizer, regulariser, device):
    """Load last.pt into the model, optimizer, SMART teacher and RNGs; return its progress."""
    state = load_checkpoint(path)
    model.load_state_dict(checked_model_state(path, state, model))
    try:
        optimizer.load_state_dict(state["optimizer"])
        if regulariser is not None:
            regulariser.load_state_dict(state.get("smart"))
        ranks_rng = state["ranks_rng"]
        if len(ranks_rng) == distributed.WORLD_SIZE:
            rng = ranks_rng[distributed.RANK]
            torch.set_rng_state(rng["torch_rng"])
            if device.type == "cuda" and "cuda_rng" in rng:
                torch.cuda.set_rng_state(rng["cuda_rng"], device)
        # another number of ranks: the same batches, new dropout masks (the seeds train.main set)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # its first line says what differs
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: its optimizer or SMART state does not fit this run ({reason})") from None
    return state["progress"]
