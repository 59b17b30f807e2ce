"""SMART: smoothness-inducing adversarial regularisation and momentum Bregman proximal point steps.

Jiang et al., ACL 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
Models through Principled Regularized Optimization". Fine-tuning minimises

    F(θ) = L(θ) + λ_s R_s(θ)                                                  (objective, §3.1)
    R_s(θ) = 1/n Σ_i max_{‖x̃_i − x_i‖∞ ≤ ε} l_s(f(x̃_i; θ), f(x_i; θ))          (eq. 3)
    l_s(P, Q) = D_KL(P‖Q) + D_KL(Q‖P)    classification (SST, CFIMDB, PARA)
    l_s(p, q) = (p − q)²                 regression (STS, on the cosine)

with momentum Bregman proximal point steps: each step minimises F(θ) + μ D_Breg(θ, θ̃) where

    D_Breg(θ, θ̃) = 1/n Σ_i l_s(f(x_i; θ), f(x_i; θ̃))                            (eq. 5)
    θ̃ ← (1 − β) θ + β θ̃         after every optimizer step, θ̃ starting as θ     (eq. 6)

The inner max of eq. 3 is approximated as in the paper's Algorithm 1, on the word embeddings
x = E_word[ids]:

    x̃ = x + ν,  ν ~ N(0, σ² I)                                   (random start)
    K times:  g̃ = ∇_x̃ l_s(f(x̃), f(x)) / ‖∇_x̃ l_s(f(x̃), f(x))‖∞   (per example; f(x) a fixed target)
              x̃ ← Π_{‖x̃ − x‖∞ ≤ ε}(x̃ + η g̃)                      (projection = clamp of x̃ − x)

Paper defaults: ε = 1e-5, σ = 1e-5, η = 1e-3, K = 1, μ = 1, β = 0.99, λ_s ∈ {1, 3, 5}.
With K = 0 the random start is used as it is (Algorithm 1 projects only after an ascent step).

`SmartRegulariser(model)(batches)` returns Σ_tasks [λ_s R_s + μ D_Breg] (summed over the step's
tasks, each term a batch mean); train.py adds it to the combined task loss and calls
`update_teacher()` after `optimizer.step()`.

Choices the paper leaves open, and what we do:
- Dropout is off (eval mode) for the whole regulariser: the ascent, both sides of R_s and D_Breg.
  With ε = 1e-5 the perturbation moves the outputs by ~1e-5, while two dropout masks move them by
  O(1): with dropout on, R_s would measure dropout noise, not smoothness. The graphs built in eval
  mode back-propagate as usual after the training mode is restored.
- In the final R_s both sides carry gradient, as eq. 3 reads (f(x; θ) on both sides). smart-pytorch
  0.0.4 passes the clean output undetached to its last loss too, but its bundled `sym_kl_loss`
  detaches the probabilities P of each D_KL(P‖Q), so only the log-probabilities get gradient: the
  same value, a different gradient. Ours is the exact gradient of the symmetric KL.
- The ascent takes gradients with torch.autograd.grad with respect to the perturbation only, on
  detached embeddings: nothing reaches the parameters' .grad.
- smart-pytorch 0.0.4 rescales the perturbation to a unit ∞-norm per token (mt-dnn also normalises
  it) instead of projecting it into the ε-ball, and neither has the teacher; we follow the paper.
- STS encodes its two sentences separately; each gets its own perturbation and ε-ball.
- PARA has one logit z; its distribution is [1 − sigmoid(z), sigmoid(z)] = softmax([0, z]).

Cost: the clean output is recomputed here with dropout off (the task loss's forward has dropout
on), so per task and step: K + 2 forward passes with gradient (clean, K ascent, perturbed), one
teacher forward under no_grad, K backward passes to the perturbation, and a training backward
through two more graphs, against one forward and one backward for a plain step. `python bench.py
--only smart` times the two (SST batches of 32, all-MiniLM-L6-v2, AdamW); an earlier measurement
at batch 8 on 2 shared CPU cores gave 3.5-3.8x for a SMART step (K = 1). Those dropout-free passes
with gradient are one reason bert.py writes the attention out on the CPU: with sdpa's fused
kernel there, a SMART step of train.py (bf16, SST batches of 32) took 4.6x a plain one (1818-1826
ms), written out 3.0-3.9x (1322-1590 ms, four timings), in turns on a noisy machine.

Surprising: at the paper's ε = 1e-5 the adversarial term is small on this checkpoint, whose word
embeddings have mean |x| ≈ 0.04. Measured on an SST model fine-tuned by `train.py --tasks sst`
(its best.pt), four training batches of 32, σ = 1e-5, η = 1e-3, K = 1, R_s averaged:

    ε        1e-5     1e-4     1e-3     1e-2
    float32  1.9e-5   1.2e-3   6.1e-3   5.7e-3
    bf16     6.4e-5   1.1e-3   5.6e-3   5.3e-3

Under bfloat16 autocast a 1e-5 change is below the activations' rounding (bf16 keeps 8 bits of
mantissa), so at 1e-5 its R_s is mostly that rounding: larger than float32's. Above ε ≈ σ + Kη
the ball no longer binds (one ascent step moves x̃ by at most η), so 1e-2 gives what 1e-3 does.
An earlier session measured R_s ≈ 1e-8 next to D_Breg ≈ 1e-2 after 20 steps from the fresh head.
"""
from contextlib import contextmanager
import copy

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- l_s

def at_least_float32(t):
    """bfloat16/float16 outputs (autocast) are compared in float32; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def symmetric_kl(p_logits, q_logits):
    """mean_b [D_KL(P_b‖Q_b) + D_KL(Q_b‖P_b)], P = softmax(p_logits), Q = softmax(q_logits).

    Uses D_KL(P‖Q) + D_KL(Q‖P) = Σ_c (p_c − q_c)(log p_c − log q_c), exactly 0 when P = Q."""
    log_p = F.log_softmax(at_least_float32(p_logits), dim=-1)
    log_q = F.log_softmax(at_least_float32(q_logits), dim=-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1).mean()


def class_logits(task, output):
    """The head's output as logits of a class distribution: PARA's one logit z becomes [0, z]."""
    if task == "para":
        return torch.stack([torch.zeros_like(output), output], dim=-1)
    return output


def smoothness_loss(task, output, other):
    """l_s between two outputs of the same head, averaged over the batch."""
    if task == "sts":
        return (at_least_float32(output) - at_least_float32(other)).pow(2).mean()  # l_s(p, q) = (p − q)²
    return symmetric_kl(class_logits(task, output), class_logits(task, other))


# ----------------------------------------------------------------------------- the adversarial perturbation

@contextmanager
def dropout_off(model):
    """Eval mode inside the block; every submodule gets back its own mode afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def word_embeddings(model, inputs):
    """x = E_word[ids] of each encoder input: what SMART perturbs."""
    return [model.encoder.word_embeddings(enc["input_ids"]) for enc in inputs]


def per_example_inf_norm(grad):
    """‖g_i‖∞ over everything but the batch dimension, shaped to broadcast against g."""
    return grad.abs().amax(dim=tuple(range(1, grad.dim())), keepdim=True)


def ascent_step(delta, grad, step_size, eps):
    """One projected, ∞-norm-normalised gradient ascent step on the perturbation δ = x̃ − x."""
    tiny = torch.finfo(grad.dtype).tiny  # an all-zero gradient gives no step, not 0/0
    direction = grad / per_example_inf_norm(grad).clamp_min(tiny)  # g̃ = ∇ / ‖∇‖∞
    return (delta + step_size * direction).clamp(-eps, eps)      # Π_{‖x̃ − x‖∞ ≤ ε}(x̃ + η g̃)


def adversarial_perturbation(model, task, inputs, embeds, clean_output, sigma, step_size, eps, n_steps):
    """δ for each input after a random start and `n_steps` projected ascent steps on
    l_s(f(x + δ), f(x)). The embeddings and f(x) are held fixed (detached); returns detached δs."""
    embeds = [x.detach() for x in embeds]
    target = clean_output.detach()
    deltas = [torch.randn_like(x) * sigma for x in embeds]  # ν ~ N(0, σ² I)
    with torch.enable_grad():
        for _ in range(n_steps):
            deltas = [d.requires_grad_() for d in deltas]
            perturbed = model(task, inputs, embeds=[x + d for x, d in zip(embeds, deltas)])
            grads = torch.autograd.grad(smoothness_loss(task, perturbed, target), deltas)
            deltas = [ascent_step(d.detach(), g, step_size, eps) for d, g in zip(deltas, grads)]
    return deltas


# ----------------------------------------------------------------------------- the regulariser

class SmartRegulariser:
    """λ_s R_s + μ D_Breg for a MultitaskBert, with the teacher θ̃ of eq. 6.

    The teacher is a frozen copy of the whole model (encoder and heads) held here, not registered
    in the model, so it is not in model.parameters() and no optimizer sees it. It is made on the
    model's device: build the regulariser after model.to(device)."""

    def __init__(self, model, lambda_s=1.0, eps=1e-5, sigma=1e-5, step_size=1e-3, n_steps=1, mu=1.0, beta=0.99):
        if not (lambda_s >= 0 and mu >= 0 and eps > 0 and sigma >= 0 and step_size >= 0):
            raise ValueError("SMART needs lambda_s, mu, sigma, step_size >= 0 and eps > 0")
        if not (isinstance(n_steps, int) and n_steps >= 0 and 0 <= beta < 1):
            raise ValueError(f"SMART needs a whole n_steps >= 0 and 0 <= beta < 1, got {n_steps}, {beta}")
        self.model = model
        self.lambda_s, self.mu, self.beta = lambda_s, mu, beta
        self.eps, self.sigma, self.step_size, self.n_steps = eps, sigma, step_size, n_steps
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)  # θ̃ starts as θ

    def terms(self, task, inputs):
        """(R_s, D_Breg) for one task's batch, both carrying gradient to θ (eq. 3, eq. 5)."""
        with dropout_off(self.model):
            x = word_embeddings(self.model, inputs)
            clean = self.model(task, inputs, embeds=x)  # f(x; θ)
            r_s = clean.new_zeros((), dtype=torch.float32)
            if self.lambda_s > 0:
                deltas = adversarial_perturbation(self.model, task, inputs, x, clean, self.sigma,
                                                  self.step_size, self.eps, self.n_steps)
                perturbed = self.model(task, inputs, embeds=[xi + d for xi, d in zip(x, deltas)])  # f(x̃; θ)
                r_s = smoothness_loss(task, perturbed, clean)  # l_s(f(x̃; θ), f(x; θ))       (eq. 3)
            d_breg = clean.new_zeros((), dtype=torch.float32)
            if self.mu > 0:
                with torch.no_grad():
                    teacher = self.teacher(task, inputs)  # f(x; θ̃)
                d_breg = smoothness_loss(task, clean, teacher)  # l_s(f(x; θ), f(x; θ̃))   (eq. 5)
        return r_s, d_breg

    def __call__(self, batches):
        """Σ_tasks [λ_s R_s + μ D_Breg] for batches {task: {'inputs': [...], 'labels': ...}}."""
        if not batches:
            raise ValueError("no task batches to regularise; the step must contain at least one task")
        total = 0.0
        for task, batch in batches.items():
            r_s, d_breg = self.terms(task, batch["inputs"])
            total = total + self.lambda_s * r_s + self.mu * d_breg
        return total

    @torch.no_grad()
    def update_teacher(self):
        """θ̃ ← (1 − β) θ + β θ̃, after every optimizer step (eq. 6)."""
        for teacher, param in zip(self.teacher.parameters(), self.model.parameters()):
            teacher.mul_(self.beta).add_(param, alpha=1 - self.beta)

    def state_dict(self):
        """The teacher's parameters: tensors in plain dicts (torch.load(weights_only=True)-safe)."""
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state):
        teacher = state.get("teacher") if isinstance(state, dict) else None
        expected = self.teacher.state_dict()
        if not isinstance(teacher, dict) or set(teacher) != set(expected):
            raise ValueError("SMART state does not fit this model; resume with the same --tasks and --compile")
        self.teacher.load_state_dict(teacher)
