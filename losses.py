"""Task losses and the strategies that combine them into one training loss.

Task losses (one per head, each a scalar mean over the batch):
    SST (5-way) and CFIMDB (2-way) sentiment   cross-entropy on the class logits
    PARA (Quora paraphrase, binary)            binary cross-entropy on one logit per pair
    STS (similarity, gold score 0..5)          MSE between 5 x the cosine similarity of the two
                                               sentence embeddings and the score

Combining strategies, as compared in the "multi-task BERT" study (CS224N 2023 default project
style; the equation numbers are the study's). The geometric loss strategy was introduced by
Chennupati et al. 2019, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy
for Multi-Task Learning":

    sum  (eq. 1)  L = sum_i L_i
    GLS  (eq. 7)  L = (prod_{i=1..n} L_i)^(1/n)                              geometric mean
    FLS  (eq. 8)  L = (prod_{i=1..n} L_i)^(1/n) * (prod_{j in F} L_j)^(1/|F|) GLS times the
                                                                            focused tasks' GLS

Why GLS: its gradient is dGLS/dL_i = GLS / (n L_i), so each task is weighted by the inverse of its
own loss. A task whose loss is large (e.g. STS MSE vs. a PARA BCE) no longer dominates the sum.
Rescaling one task's loss by a constant c multiplies GLS, and so the whole gradient, by c^(1/n)
without changing its direction, and Adam's update does not change under a global rescaling of
the gradient (up to its ε): so under GLS and FLS the scale of a task's loss does not matter, as
long as every step holds every task (the break and round-robin samplers), the gradient is not
clipped (clipping looks at its norm) and no SMART term is added (those are not rescaled). With
one task per step (sequential, proportional) GLS of the one loss is that loss, and the scales
matter, as under the sum: Adam normalises each weight by its own running gradient size, so a
task's own head does not care, but on the shared encoder a task with a 25x smaller loss takes
steps roughly 25x smaller than the tasks it alternates with.

What FLS does, by sampler:
- Every task in every step (break, round-robin): dFLS/dL_j = FLS (1/n + 1/|F|) / L_j for a focused
  task j and FLS / (n L_i) for the others: relative to the other tasks, a focused task's gradient
  weight is (1 + n/|F|) times what GLS gives it, 4 times for PARA alone among three tasks.
- One task per step (sequential, proportional): a PARA step with focus=('para',) gets L_para ·
  L_para = L_para², whose gradient 2 L_para ∇L_para is *smaller* than a plain PARA step's once
  L_para < 0.5: the focused task's steps shrink as it learns, the opposite of a focus.
  FLS when no focused task is in this step's losses is just GLS: only the focused tasks present in
  `losses` count towards the second factor.

Distillation (distill.py) compares a head with a soft target q: a mix of the gold label and a
teacher's prediction. Its cross-entropy -sum_c q_c log p_c never falls below the entropy H(q) of
the target, reached when p = q; the KL divergence KL(q || p) = cross-entropy - H(q) has the same
gradient in the logits, p - q, but falls to 0 as the plain loss does. Under the sum that constant
changes nothing; under GLS it does, since GLS weighs task i by GLS / (n L_i): a task whose loss
cannot fall below H(q) keeps a smaller weight, next to the other tasks, than the same task measured
by its KL: by the factor KL / (KL + H(q)) next to STS, whose squared error has no floor (GLS itself
and Adam take any common factor away). How large H(q) is: the default single-task teachers' own
targets (λ = 0) have a mean entropy of 0.87 nats on SST and 0.19 on PARA (the mix's H is 0 at λ = 1,
not always less on the way). At the first steps, with a near-uniform student p, SST's KL(q || p) ≈ log 5 - H(q) = 0.74
against a cross-entropy of log 5 = 1.61: cross-entropy gives SST under half the weight next to STS
that KL does, and less as the student learns (the KL falls, H(q) stays until λ rises). Measured
(the study's student-anneal-ce row against student-anneal, seeds 11711 and 1): cross-entropy
trails KL at each seed in every epoch, most in the first (overall 0.739 and 0.731 against 0.747
and 0.746; SST 0.457 and 0.448 against 0.474 and 0.476), and ends 0.001 and 0.008 lower (0.7551,
0.7459 against 0.7565, 0.7542): within seed noise over two seeds, but in the direction derived
here. So train.py uses the KL (--distill_loss kl, the default).

The floor. Both geometric strategies are computed in log space, exp(mean_i log L_i), since a
product of many small losses underflows, and each L_i is first clamped below at LOSS_FLOOR = 1e-8:
log(0) is -inf and dGLS/dL_i = GLS / (n L_i) grows without bound as L_i -> 0, so a solved task (a
loss of exactly 0, or 1e-30) would otherwise give NaN or inf. The clamp is a cliff, not a smooth
cap: just above the floor a task gets the largest weight GLS gets, GLS / (n · 1e-8), and below it
none. A batch of 32 has a mean cross-entropy under 1e-8 only if every example's true class gets a
probability above 1 - 3.2e-7 (and a mean STS error under 1e-8 only if every prediction is within
5.7e-4 of its score), so on real batches the cliff guards against NaN rather than weighting tasks.
"""
import torch
import torch.nn.functional as F

LOSS_FLOOR = 1e-8   # each task loss is clamped to at least this before its log (see above)
STS_MAX_SCORE = 5.0  # STS gold scores run from 0 to 5


# ---------------------------------------------------------------------------------------------
# Task losses

def cross_entropy_loss(logits, labels):
    """Mean cross-entropy for SST (5 classes) and CFIMDB (2 classes).
    logits: (batch, n_classes) float; labels: (batch,) int64 class indices."""
    return F.cross_entropy(logits, labels)


def binary_cross_entropy_loss(logit, labels):
    """Mean binary cross-entropy for PARA, from one logit per sentence pair.

    logit: (batch,) or (batch, 1); labels: (batch,) 0/1, int or float. Uses the with-logits form,
    log(1 + exp(-z)) computed stably, rather than sigmoid followed by log, which gives -inf for a
    confident wrong prediction."""
    return F.binary_cross_entropy_with_logits(logit.reshape(-1), labels.reshape(-1).to(logit.dtype))


def similarity_mse_loss(cosine, scores):
    """Mean squared error between the scaled cosine similarity of the two sentence embeddings
    and the gold STS score:  L = mean_b (5 cos_b - score_b)^2.

    cosine: (batch,) in [-1, 1]; scores: (batch,) in [0, 5]. sentence-transformers'
    CosineSimilarityLoss compares cos with score / 5 instead, which is this loss / 25. Under GLS and
    FLS with every task in every step the two scales train the same (see the module docstring),
    and do, measured: GLS + round-robin on --limit 2000 with either scale, all else equal, ended
    with the same dev scores to 6 digits (results/README.md, "Choices measured"). Under --loss sum
    the score / 5 form multiplies STS's part of the gradient by 1/25, and with one task a step it
    shrinks STS's steps against the others' (Adam's second moments are shared by all steps)."""
    return F.mse_loss(STS_MAX_SCORE * cosine.reshape(-1), scores.reshape(-1).to(cosine.dtype))


# ---------------------------------------------------------------------------------------------
# Distillation: the same losses against a teacher's soft targets (distill.py builds the targets)

def soft_cross_entropy_loss(logits, target):
    """Mean cross-entropy against a distribution: L = mean_b -sum_c q_bc log p_bc, with p the
    softmax of the logits. With a one-hot q it is cross_entropy_loss.
    logits, target: (batch, n_classes); each row of target sums to 1."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def soft_binary_cross_entropy_loss(logit, target):
    """binary_cross_entropy_loss against a probability q in [0, 1] in place of a 0/1 label:
    mean_b -(q_b log σ(z_b) + (1 - q_b) log(1 - σ(z_b)))."""
    return F.binary_cross_entropy_with_logits(logit.reshape(-1), target.reshape(-1).to(logit.dtype))


def target_entropy(target, binary=False):
    """Mean entropy of the targets, H(q) = -sum_c q_c log q_c (0 log 0 = 0): what a soft
    cross-entropy never falls below. Cross-entropy - H(q) is the KL divergence KL(q || p)."""
    if binary:
        target = torch.stack([target, 1 - target], dim=-1)
    return -torch.special.xlogy(target, target).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# Combining one step's task losses: each strategy takes {task_name: scalar loss tensor}

def _stacked(losses):
    """The task losses of one step as a 1-D tensor, in the dict's order."""
    if not losses:
        raise ValueError("no task losses to combine; the step must contain at least one task")
    for task, loss in losses.items():
        if loss.dim() != 0:
            raise ValueError(f"loss for task {task!r} has shape {tuple(loss.shape)}, expected a "
                             "scalar; reduce it with .mean() first")
    return torch.stack(list(losses.values()))


def _mean_log(task_losses):
    """mean_i log max(L_i, LOSS_FLOOR): the log of the geometric mean, finite for any L_i >= 0."""
    return task_losses.clamp(min=LOSS_FLOOR).log().mean()


def sum_loss(losses):
    """L = sum_i L_i  (eq. 1)."""
    return _stacked(losses).sum()


def geometric_mean_loss(losses):
    """GLS: L = (prod_{i=1..n} L_i)^(1/n) = exp(mean_i log L_i)  (eq. 7). With one task, L = L_1."""
    return torch.exp(_mean_log(_stacked(losses)))


def focused_loss(losses, focus):
    """FLS: L = (prod_{i=1..n} L_i)^(1/n) * (prod_{j in F} L_j)^(1/|F|)  (eq. 8).

    F is the set of tasks in `focus` (a list/tuple of task names; a single name is also accepted)
    that are present in this step's `losses`. If none is present, FLS is GLS."""
    if isinstance(focus, str):
        focus = (focus,)
    log_loss = _mean_log(_stacked(losses))                             # log GLS, eq. 7
    focused = {task: loss for task, loss in losses.items() if task in focus}
    if focused:
        log_loss = log_loss + _mean_log(_stacked(focused))             # + log GLS over F, eq. 8
    return torch.exp(log_loss)


def combine_losses(losses, strategy, focus=("para",)):
    """One training loss from one step's task losses, by strategy 'sum', 'gls' or 'fls'."""
    if strategy == "sum":
        return sum_loss(losses)
    if strategy == "gls":
        return geometric_mean_loss(losses)
    if strategy == "fls":
        return focused_loss(losses, focus)
    raise ValueError(f"unknown loss strategy {strategy!r}; use one of 'sum', 'gls', 'fls'")
