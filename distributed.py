"""Data-parallel training under torchrun: what changes when N processes train one model.

    torchrun --nproc_per_node 4 train.py --loss gls --sampler roundrobin --data_dir ../shared/data

Each process (a rank) runs train.py's one-process loop over the same epoch plan, built from
(seed, epoch), and takes every N-th example of each of the step's batches (`shard`). Three things
then make the N ranks take the step one process would take on the whole (global) batch, up to
float rounding once dropout is 0 and, under --smart, --smart_sigma is 0 (each rank draws its own
dropout masks and SMART noise, from seed + rank):

1. The task losses become the global batch's means before the loss strategy combines them
   (`global_means`). GLS and FLS are not linear in the task losses, so the combination of the
   ranks' own losses would be another loss, not a share of the same one.
2. After the one backward pass the gradients are summed over the ranks (`all_reduce_gradients`).
3. Evaluation: each rank predicts every N-th batch and the predictions are gathered (`gathered`).

Rank 0 alone prints and writes files; every rank must see --out_dir (one machine, or a shared
file system). nccl on GPUs (one per local rank), gloo on CPU. One process (no torchrun) is the
case RANK = 0, WORLD_SIZE = 1, where every function here does nothing or returns its input.
"""
import atexit
import os

import torch
import torch.distributed as dist

RANK, WORLD_SIZE = 0, 1  # this process and the number of processes; set by start() under torchrun


def start(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) join the process group,
    once per process, and return this rank's device; otherwise return `device` as it is."""
    global RANK, WORLD_SIZE
    if "RANK" not in os.environ:
        RANK, WORLD_SIZE = 0, 1
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} CUDA "
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


def shard(indices):
    """This rank's part of one global batch, indices[RANK::WORLD_SIZE], and its share of the batch.
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
        M = Σ_r (n_r / B) m_r,  so  dM/dθ = Σ_r (n_r / B) dm_r/dθ.
    Each rank all-reduces the values (n_r / B) m_r to get M, and returns M + (n_r / B)(m_r - m_r),
    the second m_r detached: its value is exactly M, its gradient rank r's term of dM/dθ. A loss
    C(M_1, .., M_n) built from these is the same number on every rank, its backward gives dC/dM_t
    at the global M (as GLS and FLS need) times rank r's terms, and summing the ranks' gradients
    gives exactly one process's gradient of C on the global batch, however unevenly it was split.
    Non-finite values stay non-finite in M, so every rank skips the same steps."""
    if WORLD_SIZE == 1:
        return local_means
    totals = torch.stack([m.detach().float() * shares[task] for task, m in local_means.items()])
    dist.all_reduce(totals)
    return {task: total + shares[task] * (m - m.detach()) for (task, m), total in zip(local_means.items(), totals)}


@torch.no_grad()
def all_reduce_gradients(params):
    """Sum every gradient over the ranks (each already carries only its share, see global_means),
    through one flat buffer: one collective per step, not one per tensor.

    Why not DistributedDataParallel: a step here runs several forwards (one per task, and SMART's
    clean, ascent, perturbed and teacher passes) before its one backward, which DDP's per-forward
    gradient hooks do not expect. One all-reduce after the backward is right for any number of
    forwards, at the cost of not overlapping the communication with the backward pass."""
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
