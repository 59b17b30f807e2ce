"""AdamW and AdaBelief written out by hand, and gradient clipping by the global norm.

AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2) and
AdaBelief (Zhuang et al. 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
Gradients", Algorithm 2), for gradient g_t at step t, learning rate η, weight decay λ:

                 AdamW                                AdaBelief
  weight decay   θ ← (1 - ηλ) θ                       θ ← (1 - ηλ) θ
  1st moment     m_t = β1 m_{t-1} + (1 - β1) g_t      m_t = β1 m_{t-1} + (1 - β1) g_t
  2nd moment     v_t = β2 v_{t-1} + (1 - β2) g_t²     s_t = β2 s_{t-1} + (1 - β2) (g_t - m_t)² + ε
  bias correct.  m̂_t = m_t / (1 - β1^t)               m̂_t = m_t / (1 - β1^t)
                 v̂_t = v_t / (1 - β2^t)               ŝ_t = s_t / (1 - β2^t)
  update         θ ← θ - η m̂_t / (√v̂_t + ε)           θ ← θ - η m̂_t / (√ŝ_t + ε)

The belief term: Adam divides by the root mean square of the gradient, AdaBelief by the root
mean square of its *surprise* g_t - m_t, i.e. of how far the gradient strays from the momentum
that "predicts" it. Where gradients are large but consistent (a steep, straight slope), s_t is
small and the step is large; where they are noisy, s_t is large and the step shrinks. Adam cannot
tell the two apart because g_t² is large in both.

Surprises:
- The weight decay is multiplied by the learning rate (ηλ), as in torch.optim.AdamW; the paper
  multiplies λ by the schedule multiplier only.
- AdaBelief adds ε inside s_t *and stores it*, so ε accumulates in the state (as the paper's
  Algorithm 2 and adabelief-pytorch 0.2.1 do), and again outside the square root.
- AdaBelief's rectification (`rectify`, from RAdam, Liu et al. 2020) takes plain SGD-with-momentum
  steps θ ← θ - η m̂_t while the variance estimate is too young (the first five steps at
  β2 = 0.999) and then scales the step by RAdam's r_t. Every detail (the ρ_t ≥ 5 threshold, where
  ε sits in the rectified step, amsgrad's maximum being ignored there) follows
  adabelief-pytorch 0.2.1 with its defaults, so the two agree to float rounding.

Both optimizers update all parameters with torch._foreach_* ops (one call per equation over a
list of tensors), cut into cache-sized chunks on CPU; see `_cache_sized_chunks`. That is eight
passes over each chunk and some 700 small calls a step, where torch's fused kernel makes one pass
over each tensor. With `fused=True` the same equations, written once more for a single tensor
(`_adamw_one_pass`), are compiled by torch.compile into one loop per tensor. From
`python bench.py --only optimizer` (22.7M MiniLM parameters, 2 threads, the 2-core CPU otherwise
idle), ms a step:

  optim.AdamW 23.2, fused=True 13.9;  optim.AdaBelief 23.4, fused=True 14.2
  torch.optim.AdamW 47.6 (default for-loop), 43.5 (foreach=True), 10.0 (fused=True)

so 2.3x torch's fused kernel eager and 1.4x compiled. What is left is the cost of ~100 separate
calls, one per parameter tensor: compiling the foreach form over all lists at once measured 1.05x,
but took 25 s to compile, and compiles again for every new list of shapes (another model, a
frozen encoder), so the per-tensor form, compiled once for all lengths, is the one kept.
"""
import math

import torch


class NonFiniteGradientError(RuntimeError):
    """The gradient norm is NaN or inf; the gradients were left as they were."""


# ----------------------------------------------------------------------------- gradient clipping

@torch.no_grad()
def clip_grad_norm(parameters, max_norm):
    """Scale all gradients in place so that their joint L2 norm is at most `max_norm`.

    The norm is taken over all gradients as if concatenated into one vector,
        ‖g‖ = √(Σ_i ‖g_i‖²),
    and every gradient is multiplied by min(1, max_norm / (‖g‖ + 1e-6)), as torch's
    clip_grad_norm_ does. Parameters without a gradient are skipped. Returns ‖g‖ before clipping.
    A NaN or inf norm raises NonFiniteGradientError and leaves the gradients untouched: scaling
    by it would silently turn every weight into NaN at the next optimizer step.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads, 2)                                   # ‖g_i‖
    total_norm = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    if not torch.isfinite(total_norm):
        raise NonFiniteGradientError(
            f"gradient norm is {total_norm.item()}: the loss or a gradient has a NaN/inf; lower the "
            "learning rate or look for a log(0) / division by zero in the loss")
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale)
    return total_norm


# ----------------------------------------------------------------------------- AdamW

class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2).

    Per parameter θ with gradient g_t, at step t (line numbers of Algorithm 2):
        θ   ← (1 - ηλ) θ                                   decoupled weight decay (line 12)
        m_t = β1 m_{t-1} + (1 - β1) g_t                     (line 7)
        v_t = β2 v_{t-1} + (1 - β2) g_t²                    (line 8)
        m̂_t = m_t / (1 - β1^t),  v̂_t = v_t / (1 - β2^t)    (lines 9, 10)
        θ   ← θ - η m̂_t / (√v̂_t + ε)                       (line 12)
    The operations are done in torch.optim.AdamW's order, so the results are bit-identical to its
    default (for-loop) and foreach implementations; its fused kernel rounds differently.

    `fused=True` runs the same update through torch.compile, one pass per tensor (see
    `_adamw_one_pass`): about 1.4x torch's fused kernel on CPU instead of 2.3x, after a one-off
    compilation of a few seconds, equal to the foreach path up to float rounding. It is an
    attribute of the optimizer, not of its state: a saved state loads into either form. Made for
    CPU; on CUDA torch's foreach kernels already batch the whole list, and this path is untried.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            for t, tensors in _tensors_by_step(self, group, ["exp_avg", "exp_avg_sq"]).items():
                if self.fused:
                    _one_pass_each(_adamw_one_pass, tensors, _adamw_coefficients(t, group))
                    continue
                for theta, g, m, v in _cache_sized_chunks(*tensors):
                    _adamw_update(theta, g, m, v, t, group)
        return loss


def _adamw_update(theta, g, m, v, t, group):
    """One AdamW step on lists of parameters θ, gradients g and moments m, v, all at step t."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if decay != 0:
        torch._foreach_mul_(theta, 1 - lr * decay)      # θ ← (1 - ηλ) θ
    torch._foreach_lerp_(m, g, 1 - beta1)               # m_t = β1 m_{t-1} + (1 - β1) g_t
    torch._foreach_mul_(v, beta2)                       # v_t = β2 v_{t-1} + (1 - β2) g_t²
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    denom = torch._foreach_sqrt(v)                      # √v̂_t + ε = √v_t / √(1 - β2^t) + ε
    torch._foreach_div_(denom, (1 - beta2 ** t) ** 0.5)
    torch._foreach_add_(denom, eps)
    step_size = lr / (1 - beta1 ** t)                   # η m̂_t = η m_t / (1 - β1^t)
    torch._foreach_addcdiv_(theta, m, denom, -step_size)  # θ ← θ - η m̂_t / (√v̂_t + ε)


def _adamw_coefficients(t, group):
    """The numbers `_adamw_one_pass` needs at step t, in the order it reads them."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    return [1 - lr * decay, 1 - beta1, beta2, 1 - beta2, (1 - beta2 ** t) ** 0.5, eps, -lr / (1 - beta1 ** t)]


def _adamw_one_pass(theta, g, m, v, c):
    """`_adamw_update` for one tensor, written for torch.compile, which turns it into one loop
    that reads θ, g, m, v once and writes θ, m, v once; eager, each line would be a pass of its
    own. The step's numbers come in the tensor c (`_adamw_coefficients`), not as Python floats,
    so that a new t is new data rather than a new compilation."""
    theta.mul_(c[0])                                    # θ ← (1 - ηλ) θ
    m.lerp_(g, c[1])                                    # m_t = β1 m_{t-1} + (1 - β1) g_t
    v.mul_(c[2]).addcmul_(g, g, value=c[3])             # v_t = β2 v_{t-1} + (1 - β2) g_t²
    denom = v.sqrt().div_(c[4]).add_(c[5])              # √v̂_t + ε
    theta.addcdiv_(m, denom, value=c[6])                # θ ← θ - η m̂_t / (√v̂_t + ε)


# ----------------------------------------------------------------------------- AdaBelief

class AdaBelief(torch.optim.Optimizer):
    """AdaBelief (Zhuang et al. 2020, Algorithm 2), with adabelief-pytorch 0.2.1's options.

    Per parameter θ with gradient g_t, at step t:
        θ   ← (1 - ηλ) θ                          if weight_decouple (else g_t ← g_t + λθ, L2)
        m_t = β1 m_{t-1} + (1 - β1) g_t
        s_t = β2 s_{t-1} + (1 - β2) (g_t - m_t)² + ε        the belief: variance of g_t around m_t
        s_t^max = max(s_{t-1}^max, s_t)                      if amsgrad: ŝ_t uses s_t^max instead
        θ   ← θ - η m̂_t / (√ŝ_t + ε),  m̂_t = m_t / (1 - β1^t),  ŝ_t = s_t / (1 - β2^t)

    With `rectify` (RAdam, Liu et al. 2020, Algorithm 2), the last line becomes
        ρ_∞ = 2 / (1 - β2) - 1,   ρ_t = ρ_∞ - 2t β2^t / (1 - β2^t)     (length of the SMA)
        ρ_t < 5:  θ ← θ - η m̂_t                                       (SGD with momentum)
        ρ_t ≥ 5:  θ ← θ - η r_t √(1 - β2^t) / (1 - β1^t) · m_t / (√s_t + ε),
                  r_t = √( (ρ_t - 4)(ρ_t - 2) ρ_∞ / ((ρ_∞ - 4)(ρ_∞ - 2) ρ_t) )
    as adabelief-pytorch does it: ε is added to √s_t rather than to √ŝ_t, and amsgrad's maximum is
    not used (only the unrectified update uses it). The reference's `degenerated_to_sgd=True` and
    `fixed_decay=False` are the only behaviours implemented.

    `fused=True`: as for AdamW, one compiled pass per tensor (`_adabelief_one_pass`), for the
    update with decoupled weight decay and without amsgrad (the defaults); other settings, and the
    rectified SGD steps at the start, take the foreach path.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0,
                 weight_decouple=True, rectify=True, amsgrad=False, fused=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, rectify=rectify, amsgrad=amsgrad))
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            state_names = ["exp_avg", "exp_avg_var"] + (["max_exp_avg_var"] if group["amsgrad"] else [])
            for t, tensors in _tensors_by_step(self, group, state_names).items():
                coefficients = _adabelief_coefficients(t, group) if self.fused else None
                if coefficients is not None:
                    _one_pass_each(_adabelief_one_pass, tensors, coefficients)
                    continue
                for theta, g, m, s, *s_max in _cache_sized_chunks(*tensors):
                    _adabelief_update(theta, g, m, s, s_max, t, group)
        return loss


def _adabelief_update(theta, g, m, s, s_max, t, group):
    """One AdaBelief step on lists of parameters θ, gradients g, moments m, s (and s^max if
    amsgrad, else s_max is empty), all at step t."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if decay != 0 and group["weight_decouple"]:
        torch._foreach_mul_(theta, 1 - lr * decay)      # θ ← (1 - ηλ) θ
    elif decay != 0:
        g = torch._foreach_add(g, theta, alpha=decay)   # g_t ← g_t + λθ (L2, as in Adam)
    torch._foreach_mul_(m, beta1)                       # m_t = β1 m_{t-1} + (1 - β1) g_t
    torch._foreach_add_(m, g, alpha=1 - beta1)
    surprise = torch._foreach_sub(g, m)                 # s_t = β2 s_{t-1} + (1 - β2)(g_t - m_t)² + ε
    torch._foreach_mul_(s, beta2)
    torch._foreach_addcmul_(s, surprise, surprise, 1 - beta2)
    torch._foreach_add_(s, eps)
    if s_max:
        torch._foreach_maximum_(s_max[0], s)            # s_t^max = max(s_{t-1}^max, s_t)
    if group["rectify"]:
        _rectified_update(theta, m, s, t, lr, beta1, beta2, eps)
        return
    denom = torch._foreach_sqrt(s_max[0] if s_max else s)  # √ŝ_t + ε = √s_t / √(1 - β2^t) + ε
    torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
    torch._foreach_add_(denom, eps)
    step_size = lr / (1 - beta1 ** t)                   # η m̂_t = η m_t / (1 - β1^t)
    torch._foreach_addcdiv_(theta, m, denom, -step_size)  # θ ← θ - η m̂_t / (√ŝ_t + ε)


def _rectified_update(theta, m, s, t, lr, beta1, beta2, eps):
    """RAdam's rectified step on AdaBelief's s_t (see the AdaBelief docstring)."""
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    rho_inf = 2 / (1 - beta2) - 1                       # ρ_∞ = 2 / (1 - β2) - 1
    rho_t = rho_inf - 2 * t * beta2 ** t / bias_correction2  # ρ_t = ρ_∞ - 2t β2^t / (1 - β2^t)
    if rho_t < 5:                                       # θ ← θ - η m̂_t
        torch._foreach_add_(theta, m, alpha=-lr / bias_correction1)
        return
    r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    denom = torch._foreach_sqrt(s)                      # √s_t + ε
    torch._foreach_add_(denom, eps)
    step_size = lr * r_t * math.sqrt(bias_correction2) / bias_correction1
    torch._foreach_addcdiv_(theta, m, denom, -step_size)  # θ ← θ - η r_t √(1-β2^t) m̂_t / (√s_t + ε)


def _adabelief_coefficients(t, group):
    """The numbers `_adabelief_one_pass` needs at step t, or None where it does not apply
    (L2 weight decay, amsgrad, or a rectified step that is plain SGD with momentum)."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if group["amsgrad"] or (decay != 0 and not group["weight_decouple"]):
        return None
    bias_correction1, bias_correction2 = 1 - beta1 ** t, 1 - beta2 ** t
    if not group["rectify"]:                            # θ ← θ - η m̂_t / (√s_t / √(1-β2^t) + ε)
        scale, step_size = math.sqrt(bias_correction2), lr / bias_correction1
    else:                                               # θ ← θ - η r_t √(1-β2^t) m̂_t / (√s_t + ε)
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2 ** t / bias_correction2
        if rho_t < 5:
            return None
        r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        scale, step_size = 1.0, lr * r_t * math.sqrt(bias_correction2) / bias_correction1
    return [1 - lr * decay, beta1, 1 - beta1, beta2, 1 - beta2, eps, scale, -step_size]


def _adabelief_one_pass(theta, g, m, s, c):
    """`_adabelief_update` for one tensor, for torch.compile (see `_adamw_one_pass`); c comes from
    `_adabelief_coefficients`."""
    theta.mul_(c[0])                                    # θ ← (1 - ηλ) θ
    m.mul_(c[1]).add_(g * c[2])                         # m_t = β1 m_{t-1} + (1 - β1) g_t
    surprise = g - m                                    # s_t = β2 s_{t-1} + (1 - β2)(g_t - m_t)² + ε
    s.mul_(c[3]).addcmul_(surprise, surprise, value=c[4]).add_(c[5])
    denom = s.sqrt().div_(c[6]).add_(c[5])              # √s_t / scale + ε
    theta.addcdiv_(m, denom, value=c[7])                # θ ← θ - step m_t / (√s_t / scale + ε)


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


def _evaluate(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _tensors_by_step(optimizer, group, state_names):
    """Advance the step count of every parameter that has a gradient; return
    {t: [params, grads, *state tensors]} so that parameters at the same step share one set of
    bias corrections. Usually all are at the same t; a parameter whose gradient was None on some
    steps (skipped, as torch does) is behind the others."""
    by_step = {}
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients; "
                               "use nn.Embedding(sparse=False)")
        state = optimizer.state[p]
        if not state:
            state["step"] = 0
            for name in state_names:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        lists = by_step.setdefault(state["step"], [[] for _ in range(2 + len(state_names))])
        for out, tensor in zip(lists, [p, p.grad] + [state[name] for name in state_names]):
            out.append(tensor)
    return by_step


_compiled = {}


def _one_pass_each(update, tensors, coefficients):
    """Apply the compiled `update` to each parameter's tensors in turn. Contiguous tensors are
    flattened, so that one compilation (dynamic in the length) serves every shape; a tensor of
    one element, another dtype or device, or a non-contiguous one costs one more."""
    if update not in _compiled:
        _compiled[update] = torch.compile(update, dynamic=True, fullgraph=True)
    by_kind = {}  # the coefficients in the parameters' own dtype and device, as eager ops would use them
    for theta, *rest in zip(*tensors):
        c = by_kind.get((theta.dtype, theta.device))
        if c is None:
            c = by_kind[theta.dtype, theta.device] = torch.tensor(coefficients, dtype=theta.dtype, device=theta.device)
        if all(t.is_contiguous() for t in (theta, *rest)):
            theta, rest = theta.view(-1), [t.view(-1) for t in rest]
        _compiled[update](theta, *rest, c)


def compile_fused_update(optimizer):
    """Compile a fused=True optimizer's update now, on a small stand-in for its first parameter,
    rather than at the first step: a machine without a working C++ compiler then fails before
    training starts. (The first real step may still compile a variant or two; no step after it.)"""
    update = _adamw_one_pass if isinstance(optimizer, AdamW) else _adabelief_one_pass
    like = optimizer.param_groups[0]["params"][0]
    stand_in = lambda requires_grad=False: torch.zeros(64, dtype=like.dtype, device=like.device,
                                                       requires_grad=requires_grad)
    tensors = [[stand_in(like.requires_grad)], [stand_in()], [stand_in()], [stand_in()]]  # θ, g, and the moments
    with torch.no_grad():  # as in step()
        _one_pass_each(update, tensors, [1.0] * (7 if update is _adamw_one_pass else 8))


CHUNK_NUMEL = 1 << 18  # 1 MiB of float32 per tensor; θ, g, m, v and a temporary fit in cache


def _cache_sized_chunks(*tensor_lists, numel=CHUNK_NUMEL):
    """Yield the lists cut into chunks of about `numel` elements each, as flat views.

    The update is elementwise, so applying it to views of pieces of the tensors is the same
    computation. Applied to the whole list at once, every foreach op streams all parameters (22M
    numbers for MiniLM) through memory, eight times per step, and the denominator is a fresh 90 MB
    allocation; a chunk instead stays in cache from the first op to the last. On CPU this makes the
    step about twice as fast; on GPU the foreach kernels already batch the whole list."""
    if not all(t.device.type == "cpu" for t in tensor_lists[0]):
        yield tensor_lists
        return
    chunk, filled = [[] for _ in tensor_lists], 0
    for tensors in zip(*tensor_lists):
        if all(t.is_contiguous() for t in tensors):
            n = tensors[0].numel()
            pieces = [[t.view(-1)[i:i + numel] for t in tensors] for i in range(0, n, numel)]
        else:
            pieces = [tensors]  # e.g. channels_last: updated whole
        for piece in pieces:
            for out, tensor in zip(chunk, piece):
                out.append(tensor)
            filled += piece[0].numel()
            if filled >= numel:
                yield chunk
                chunk, filled = [[] for _ in tensor_lists], 0
    if filled:
        yield chunk


# ----------------------------------------------------------------------------- timing

if __name__ == "__main__":
    # python optim.py: time one step on MiniLM-sized parameters (22.7M) with random gradients.
    # The optimizers take turns, so a busy machine slows them alike; the best round counts.
    import time

    from bert import BertConfig, BertModel

    def minilm_parameters():
        torch.manual_seed(0)
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        params = list(BertModel(config).parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return params

    optimizers = {"optim.AdamW": AdamW(minilm_parameters()),
                  "optim.AdamW fused=True": AdamW(minilm_parameters(), fused=True),
                  "optim.AdaBelief": AdaBelief(minilm_parameters()),
                  "optim.AdaBelief fused=True": AdaBelief(minilm_parameters(), fused=True),
                  "torch AdamW foreach=False": torch.optim.AdamW(minilm_parameters(), foreach=False),
                  "torch AdamW foreach=True": torch.optim.AdamW(minilm_parameters(), foreach=True),
                  "torch AdamW fused=True": torch.optim.AdamW(minilm_parameters(), fused=True)}
    best = dict.fromkeys(optimizers, float("inf"))
    for optimizer in optimizers.values():
        for _ in range(6):  # creates the state; past AdaBelief's first (cheaper, SGD) steps
            optimizer.step()
    for _ in range(10):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            for _ in range(3):
                optimizer.step()
            best[name] = min(best[name], (time.perf_counter() - start) / 3 * 1e3)
    print(f"one step, {torch.get_num_threads()} threads, best of 10 rounds of 3 steps")
    for name, ms in best.items():
        print(f"{name:26s} {ms:6.1f} ms  ({ms / best['torch AdamW fused=True']:.1f}x fused)")
