"""AdamW and AdaBelief written out by hand, and gradient clipping by the global norm.

AdamW is Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2.
AdaBelief is Zhuang et al. 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients", Algorithm 2. It changes one line of Adam: it divides by the root mean square
of the gradient's *surprise* g_t - m_t, not of g_t itself, so steps are large where gradients are
large but consistent and small where they are noisy. Its optional rectification is RAdam's
(Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond").

Each update rule is one function on one tensor (`adamw_update`, `adabelief_update`) with the
equations beside its lines; the optimizers loop over the parameters and call it. Their steps are
bit for bit those of torch.optim.AdamW(foreach=False) and of adabelief-pytorch 0.2.1. `fused=True`
passes the same function through torch.compile, which makes it one loop over each tensor: on a
2-core CPU 1.22x the time of torch's fused AdamW kernel, where the eager form takes 3.65x (README);
train.py uses it wherever it compiles (python bench.py --only optimizer).

Surprises:
- Weight decay is multiplied by the learning rate, θ ← (1 - ηλ) θ, as torch.optim.AdamW does it.
  The paper multiplies λ by the schedule multiplier only.
- AdaBelief adds ε inside s_t *and stores it*, so ε builds up in the state, and adds it again
  outside the square root, as the paper and adabelief-pytorch do.
- `AdaBelief()` with its defaults runs the RECTIFIED variant (rectify=True, adabelief-pytorch
  0.2.1's default too): its first five steps (at β2 = 0.999) are plain SGD with momentum.
- Weight decay applies to every parameter it is given, LayerNorm weights and biases included,
  where BERT's and nanoGPT's recipes put those in a group without decay. At this project's
  defaults it hardly matters: decay multiplies a weight by ∏(1 - η_t λ) ≈ exp(-λ Σ_t η_t), and
  the main command's 1,518 steps (3 epochs of 506) at a mean rate of 5e-5 (1e-4 falling linearly
  to 0), with λ = 0.01, give exp(-0.00076): a 0.08% shrink over the whole run.
"""
import functools
import math

import torch


class NonFiniteGradientError(RuntimeError):
    """The gradient norm is NaN or inf; the gradients were left as they were."""


@torch.no_grad()
def clip_grad_norm(parameters, max_norm):
    """Scale all gradients in place so that their joint L2 norm ‖g‖ = √(Σ_i ‖g_i‖²) is at most
    `max_norm`: each is multiplied by min(1, max_norm / (‖g‖ + 1e-6)), as torch's clip_grad_norm_
    does. Returns ‖g‖ before clipping. Parameters without a gradient are skipped. A NaN or inf norm
    raises NonFiniteGradientError and leaves the gradients as they were: scaling by it would turn
    every weight into NaN at the next optimizer step."""
    grads = [p.grad for p in ([parameters] if isinstance(parameters, torch.Tensor) else parameters)
             if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if not torch.isfinite(total_norm):
        raise NonFiniteGradientError(
            f"gradient norm is {total_norm.item()}: the loss or a gradient has a NaN/inf; lower the "
            "learning rate or look for a log(0) / division by zero in the loss")
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale)
    return total_norm


# ----------------------------------------------------------------------------- AdamW

def adamw_update(theta, g, m, v, coefficients):
    """One AdamW step (Algorithm 2, line numbers in brackets) on a parameter θ with gradient g_t
    and moments m, v, in torch.optim.AdamW's order of operations. The step's numbers, from
    `adamw_coefficients`, are Python floats when run eagerly and one small tensor when compiled."""
    shrink, one_minus_beta1, beta2, one_minus_beta2, root_bias_correction2, eps, step_size = coefficients
    theta.mul_(shrink)                                      # θ ← (1 - ηλ) θ                     [12]
    m.lerp_(g, one_minus_beta1)                             # m_t = β1 m_{t-1} + (1 - β1) g_t    [7]
    v.mul_(beta2).addcmul_(g, g, value=one_minus_beta2)     # v_t = β2 v_{t-1} + (1 - β2) g_t²   [8]
    denom = v.sqrt().div_(root_bias_correction2).add_(eps)  # √v̂_t + ε, v̂_t = v_t / (1 - β2^t)  [10]
    theta.addcdiv_(m, denom, value=step_size)               # θ ← θ - η m̂_t / (√v̂_t + ε)    [9, 12]


def adamw_coefficients(group, t):
    """The numbers `adamw_update` needs at step t, computed in double precision as torch does."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    return (1 - lr * group["weight_decay"], 1 - beta1, beta2, 1 - beta2,
            (1 - beta2 ** t) ** 0.5,                        # √(1 - β2^t)
            group["eps"],
            -(lr / (1 - beta1 ** t)))                       # -η / (1 - β1^t), as η m̂_t = η m_t / (1 - β1^t)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay: `adamw_update` on each parameter. `fused=True` runs it
    compiled; it belongs to the optimizer, not to its state, so a saved state loads into either.
    Made for CPU; untried on GPU."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p, state in _parameters_to_update(self, group, ["exp_avg", "exp_avg_sq"]):
                _apply(adamw_update, self.fused, [p, p.grad, state["exp_avg"], state["exp_avg_sq"]],
                       adamw_coefficients(group, state["step"]))
        return loss


# ----------------------------------------------------------------------------- AdaBelief

def adabelief_update(theta, g, m, s, s_max, coefficients, weight_decouple, kind):
    """One AdaBelief step (Algorithm 2) on a parameter θ with gradient g_t and moments m, s (and
    s^max if amsgrad, else None), in adabelief-pytorch 0.2.1's order of operations, with its
    degenerated_to_sgd=True and fixed_decay=False. `kind` is how the step ends ("adam", or if
    rectified "sgd" then "rectified"); it and the numbers come from `adabelief_coefficients`."""
    shrink, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, root, step_size = coefficients
    if weight_decouple:
        theta.mul_(shrink)                                  # θ ← (1 - ηλ) θ
    else:  # g_t ← g_t + λθ (L2, as in Adam), on a copy so that p.grad stays the gradient; not as
        # g.add(θ, alpha=λ), which torch.compile computes with λ rounded to float32
        g = g.clone().add_(theta, alpha=decay)
    m.mul_(beta1).add_(g, alpha=one_minus_beta1)            # m_t = β1 m_{t-1} + (1 - β1) g_t
    surprise = g - m                                        # s_t = β2 s_{t-1} + (1 - β2)(g_t - m_t)² + ε
    s.mul_(beta2).addcmul_(surprise, surprise, value=one_minus_beta2).add_(eps)
    if s_max is not None:
        torch.maximum(s_max, s, out=s_max)                  # amsgrad: s^max_t = max(s^max_{t-1}, s_t)
    if kind == "sgd":
        theta.add_(m, alpha=step_size)                      # rectified, ρ_t < 5: θ ← θ - η m̂_t
        return
    # adam:      θ ← θ - η m̂_t / (√ŝ_t + ε),  ŝ_t = s_t / (1 - β2^t), or s^max_t / (1 - β2^t) if amsgrad
    # rectified: θ ← θ - η r_t √(1 - β2^t) m̂_t / (√s_t + ε), never with s^max (as in adabelief-pytorch)
    belief = s_max if kind == "adam" and s_max is not None else s
    theta.addcdiv_(m, belief.sqrt().div_(root).add_(eps), value=step_size)


def adabelief_coefficients(group, t):
    """(kind, numbers) for `adabelief_update` at step t, computed as adabelief-pytorch does.

    Rectification (RAdam): ρ_∞ = 2 / (1 - β2) - 1 and ρ_t = ρ_∞ - 2t β2^t / (1 - β2^t) measure how
    many gradients the average s_t effectively holds. While ρ_t < 5 its variance is too uncertain
    and the step is SGD with momentum; after, it is scaled by
    r_t = √((ρ_t - 4)(ρ_t - 2) ρ_∞ / ((ρ_∞ - 4)(ρ_∞ - 2) ρ_t))."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    bias_correction1, bias_correction2 = 1 - beta1 ** t, 1 - beta2 ** t
    kind, root, step_size = "adam", math.sqrt(bias_correction2), lr / bias_correction1
    if group["rectify"]:
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2 ** t / bias_correction2
        if rho_t < 5:
            kind, root, step_size = "sgd", 1.0, 1.0 / bias_correction1 * lr
        else:  # η r_t √(1 - β2^t) / (1 - β1^t), multiplied out in adabelief-pytorch's order
            root_r = math.sqrt(bias_correction2 * (rho_t - 4) / (rho_inf - 4) * (rho_t - 2) / rho_t
                               * rho_inf / (rho_inf - 2))
            kind, root, step_size = "rectified", 1.0, root_r / bias_correction1 * lr
    return kind, (1 - lr * decay, decay, beta1, 1 - beta1, beta2, 1 - beta2, eps, root, -step_size)


class AdaBelief(torch.optim.Optimizer):
    """AdaBelief with adabelief-pytorch 0.2.1's options: `adabelief_update` on each parameter.
    `fused=True` runs it compiled, as for AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0,
                 weight_decouple=True, rectify=True, amsgrad=False, fused=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, rectify=rectify, amsgrad=amsgrad))
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            names = ["exp_avg", "exp_avg_var"] + (["max_exp_avg_var"] if group["amsgrad"] else [])
            for p, state in _parameters_to_update(self, group, names):
                kind, coefficients = adabelief_coefficients(group, state["step"])
                tensors = [p, p.grad, state["exp_avg"], state["exp_avg_var"], state.get("max_exp_avg_var")]
                _apply(adabelief_update, self.fused, tensors, coefficients, group["weight_decouple"], kind)
        return loss


# ----------------------------------------------------------------------------- shared plumbing

def _check_hyperparameters(lr, betas, eps, weight_decay):
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas must both be in [0, 1), got {betas}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _parameters_to_update(optimizer, group, state_names):
    """Yield (parameter, state), state created or its step count advanced, for each parameter
    with a gradient. Those without are skipped, as in torch: their step count falls behind."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients; "
                               "give the weight a dense .grad before the backward, or look up with sparse=False")
        state = optimizer.state[p]
        if not state:
            state["step"] = 0
            for name in state_names:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        yield p, state


_compiled = {}  # (update function, whether in one thread) -> its torch.compile'd form
ONE_THREAD_NUMEL = 32768  # as in torch's own kernels, a tensor this small is one thread's work


def _apply(update, fused, tensors, coefficients, *options):
    """Run `update` on one parameter's tensors as it is, a pass over memory per operation, or
    compiled into one loop that reads and writes each tensor once."""
    if not fused:
        update(*tensors, coefficients, *options)
        return
    theta = tensors[0]
    # Two compilations, each dynamic in the length, serve every shape: one loops in one thread, for
    # small tensors, where starting threads would cost more than they save (up to a time slice each
    # where other work keeps the cores busy); the other splits the loop across threads.
    one_thread = theta.numel() <= ONE_THREAD_NUMEL
    if (update, one_thread) not in _compiled:
        _compiled[update, one_thread] = torch.compile(update, dynamic=True, fullgraph=True,
                                                      options={"cpp.threads": 1} if one_thread else None)
    if all(t is None or t.is_contiguous() for t in tensors):
        # flat, so every shape is a length; detached, so no view (compiled code guards on a view's base)
        tensors = [None if t is None else t.view(-1).detach() for t in tensors]
    # the step's numbers as data, so that a new step t is no new compilation; in the parameter's
    # dtype, which eager ops compute in
    _compiled[update, one_thread](*tensors, _as_tensor(coefficients, theta.dtype, theta.device), *options)


@functools.lru_cache(maxsize=16)  # a group's parameters at one step share their numbers
def _as_tensor(numbers, dtype, device):
    return torch.tensor(numbers, dtype=dtype, device=device)


def compile_fused_update(optimizer):
    """Compile a fused=True optimizer's update now, not at its first step, so that a machine
    without a working C++ compiler fails before training: rehearse 10 steps (AdaBelief's SGD-like
    and rectified ones) with each group's options on a small and a large stand-in parameter.
    Only a parameter of another dtype or device, not contiguous or of one element, compiles later."""
    like = optimizer.param_groups[0]["params"][0]
    for group in optimizer.param_groups:
        stand_ins = [torch.nn.Parameter(torch.zeros(n, dtype=like.dtype, device=like.device))
                     for n in (ONE_THREAD_NUMEL, 2 * ONE_THREAD_NUMEL)]
        for stand_in in stand_ins:
            stand_in.grad = torch.zeros_like(stand_in)
        rehearsal = type(optimizer)(stand_ins, **{name: group[name] for name in optimizer.defaults}, fused=True)
        for _ in range(10):
            rehearsal.step()
