"""Specification of smart.py (Jiang et al., 2020): l_s against its definition in float64, the
projected ascent against the ε-ball, R_s against smart-pytorch's SMARTLoss, one whole K = 1 step
(ascent, R_s, D_Breg, their weighted sum, and the gradients of all three) against a float64
recomputation from the equations, the teacher against eq. 6, and the regulariser on a tiny real
BertModel with real sentences of all four tasks."""
import copy
import io
from functools import partial

import pytest
import torch
from smart_pytorch import SMARTLoss

import tasks
from conftest import tiny_bert
from smart import (SmartRegulariser, adversarial_perturbation, ascent_step, class_logits, dropout_off,
                   smoothness_loss, symmetric_kl, word_embeddings)

pytestmark = pytest.mark.usefixtures("one_thread")  # a tiny model: one thread is faster

PAPER = dict(lambda_s=1.0, eps=1e-5, sigma=1e-5, step_size=1e-3, n_steps=1, mu=1.0, beta=0.99)


@pytest.fixture(scope="module")
def batches(data_dir, tokenizer):
    """{task: {'inputs': [...], 'labels': ...}}: the first 4 dev examples, batched as train.py does."""
    data = {task: tasks.TaskData(task, tasks.read_examples(data_dir, task, "dev")[:4], tokenizer, max_length=32)
            for task in tasks.TASKS}
    return {task: data[task].batch([0, 1, 2, 3]) for task in tasks.TASKS}


def tiny_model(seed=0, tasks_=tasks.TASKS):
    return tasks.MultitaskBert(tiny_bert(seed), tasks_, dropout=0.1)


def nudge(model, scale=0.05, seed=1):
    """Move every parameter a little, as an optimizer step would (the teacher stays behind)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


# ----------------------------------------------------------------------------- l_s

def softmax_from_definition(logits):
    return logits.exp() / logits.exp().sum(-1, keepdim=True)


def symmetric_kl_from_definition(p, q):
    """mean_b [D_KL(P_b‖Q_b) + D_KL(Q_b‖P_b)] of two batches of class probabilities."""
    kl_pq = (p * (p / q).log()).sum(-1)
    kl_qp = (q * (q / p).log()).sum(-1)
    return (kl_pq + kl_qp).mean()


def l_s_from_definition(task, output, other):
    """l_s between two outputs of a head: (p − q)² for STS, else the symmetric KL of the class
    distributions, PARA's being [1 − sigmoid(z), sigmoid(z)]."""
    if task == "sts":
        return ((output - other) ** 2).mean()
    if task == "para":
        def distribution(z):
            return torch.stack([1 - torch.sigmoid(z), torch.sigmoid(z)], dim=-1)
    else:
        distribution = softmax_from_definition
    return symmetric_kl_from_definition(distribution(output), distribution(other))


def test_symmetric_kl_equals_its_definition_in_value_and_gradients():
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    q = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    ours = symmetric_kl(p, q)
    direct = symmetric_kl_from_definition(softmax_from_definition(p), softmax_from_definition(q))
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=0)
    # both sides carry gradient: the exact gradient of D_KL(P‖Q) + D_KL(Q‖P)
    for g_ours, g_direct in zip(torch.autograd.grad(ours, (p, q)), torch.autograd.grad(direct, (p, q))):
        torch.testing.assert_close(g_ours, g_direct, rtol=1e-10, atol=1e-12)


def test_symmetric_kl_is_zero_for_equal_distributions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    assert symmetric_kl(logits, logits.clone()).item() == 0.0
    assert abs(symmetric_kl(logits, logits + 7.0).item()) < 1e-6  # softmax ignores a shift


def test_para_logit_is_a_two_class_distribution_from_its_sigmoid():
    z = torch.tensor([-2.0, 0.0, 1.5])
    probabilities = class_logits("para", z).softmax(-1)
    torch.testing.assert_close(probabilities, torch.stack([1 - torch.sigmoid(z), torch.sigmoid(z)], -1))


def test_sts_smoothness_loss_is_squared_error_of_the_cosines():
    a, b = torch.tensor([0.9, 0.1, -0.3]), torch.tensor([0.7, 0.1, 0.2])
    torch.testing.assert_close(smoothness_loss("sts", a, b), ((a - b) ** 2).mean())


# ----------------------------------------------------------------------------- the perturbation

def test_ascent_step_normalises_the_gradient_by_each_examples_inf_norm():
    grad = torch.tensor([[[1.0, -4.0], [2.0, 0.5]],       # example 0: ‖g‖∞ = 4
                         [[0.0, 0.01], [-0.02, 0.0]]])    # example 1: ‖g‖∞ = 0.02
    step = ascent_step(torch.zeros_like(grad), grad, step_size=0.1, eps=1.0)
    torch.testing.assert_close(step[0], 0.1 * grad[0] / 4)
    torch.testing.assert_close(step[1], 0.1 * grad[1] / 0.02)


def test_ascent_step_projects_into_the_eps_ball_and_a_zero_gradient_does_not_move():
    delta = torch.tensor([[0.5, -0.05, 0.0]])
    torch.testing.assert_close(ascent_step(delta, torch.tensor([[1.0, -1.0, 0.5]]), 0.1, eps=0.1),
                               torch.tensor([[0.1, -0.1, 0.05]]))
    assert torch.equal(ascent_step(delta * 0, torch.zeros(1, 3), 0.1, eps=0.1), torch.zeros(1, 3))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_final_perturbation_lies_inside_the_eps_ball(batches, task):
    model = tiny_model().eval()
    inputs = batches[task]["inputs"]
    x = word_embeddings(model, inputs)
    eps = 1e-5
    # σ = 1e-4 > ε: the random start leaves the ball and the projection must bring it back
    deltas = adversarial_perturbation(model, task, inputs, x, model(task, inputs), sigma=1e-4,
                                      step_size=1e-3, eps=eps, n_steps=2)
    assert len(deltas) == len(inputs)
    for delta, xi in zip(deltas, x):
        assert delta.shape == xi.shape and not delta.requires_grad
        assert delta.abs().max().item() <= eps
        assert (delta.abs() == eps).any()  # η ≫ ε: the steps reach the boundary


def test_ascent_finds_a_worse_perturbation_than_the_random_start(batches):
    model, task = tiny_model().eval(), "sst"
    inputs = batches[task]["inputs"]
    x = word_embeddings(model, inputs)
    clean = model(task, inputs)

    def l_s_after(n_steps):
        torch.manual_seed(3)
        (delta,) = adversarial_perturbation(model, task, inputs, x, clean, sigma=1e-3, step_size=1e-2,
                                            eps=1e-2, n_steps=n_steps)
        return smoothness_loss(task, model(task, inputs, embeds=[x[0] + delta]), clean).item()

    assert l_s_after(2) > 2 * l_s_after(0)


def test_ascent_gradients_never_reach_the_parameters(batches):
    model = tiny_model()
    inputs = batches["sts"]["inputs"]
    x = word_embeddings(model, inputs)
    adversarial_perturbation(model, "sts", inputs, x, model("sts", inputs), sigma=1e-5,
                             step_size=1e-3, eps=1e-5, n_steps=2)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("task", ["sst", "para", "cfimdb"])
def test_r_s_with_zero_ascent_steps_equals_smart_pytorch(batches, task):
    model = tiny_model()  # training mode: the regulariser must turn dropout off itself
    inputs = batches[task]["inputs"]
    sigma = 1.0  # the tiny model is smooth: a large σ keeps R_s far from 0, so a relative 1e-6 is a real check
    regulariser = SmartRegulariser(model, **{**PAPER, "sigma": sigma, "n_steps": 0})
    torch.manual_seed(7)
    r_s, _ = regulariser.terms(task, inputs)

    reference = SMARTLoss(eval_fn=lambda embed: model(task, inputs, embeds=[embed]),
                          loss_fn=partial(smoothness_loss, task), num_steps=0, step_size=1e-3,
                          epsilon=1e-5, noise_var=sigma)  # noise_var is used as the noise's std
    model.eval()
    (x,) = word_embeddings(model, inputs)
    clean = model(task, inputs, embeds=[x])
    torch.manual_seed(7)  # the same draw: randn_like(x) * σ
    expected = reference(x, clean)
    assert r_s.item() > 1e-4
    assert r_s.item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- one whole step, in float64

def smart_step_in_float64(model, teacher, task, inputs, noise, step_size, eps):
    """(R_s, D_Breg, δ) of one K = 1 step, recomputed from the equations of smart.py's docstring
    on a float64 model and teacher, from the random start `noise` (ν, one per input)."""
    x = [model.encoder.embeddings.word.weight[enc["input_ids"]] for enc in inputs]  # x = E_word[ids]
    clean = model(task, inputs, embeds=x)  # f(x; θ)
    # the ascent, on l_s(f(x + δ), f(x)) with x and f(x) held fixed: δ = ν, then one projected step
    deltas = [nu.clone().requires_grad_() for nu in noise]
    moved = model(task, inputs, embeds=[xi.detach() + d for xi, d in zip(x, deltas)])
    grads = torch.autograd.grad(l_s_from_definition(task, moved, clean.detach()), deltas)
    deltas = [(d.detach() + step_size * g / g.abs().amax(dim=(1, 2), keepdim=True)).clamp(-eps, eps)
              for d, g in zip(deltas, grads)]  # g / ‖g_i‖∞ per example, then Π onto ‖δ‖∞ <= ε
    perturbed = model(task, inputs, embeds=[xi + d for xi, d in zip(x, deltas)])  # f(x̃; θ), δ a constant
    with torch.no_grad():
        teacher_output = teacher(task, inputs)  # f(x; θ̃)
    return l_s_from_definition(task, perturbed, clean), l_s_from_definition(task, clean, teacher_output), deltas


def assert_close_gradients(got, expected, names, max_relative_error):
    """Each parameter's gradient within max_relative_error of its float64 one (by norm); None alike."""
    for name, g, e in zip(names, got, expected):
        assert (g is None) == (e is None), name
        if e is not None:
            error = ((g.double() - e).norm() / e.norm()).item()
            assert error < max_relative_error, f"{name}: relative error {error:.1e}"


@pytest.mark.parametrize("task", tasks.TASKS)
def test_one_step_equals_a_float64_recomputation_in_values_and_gradients(batches, task):
    """The ascent's δ, R_s, D_Breg and λ_s R_s + μ D_Breg (λ_s = 3, μ = 0.5, θ ≠ θ̃) and the
    gradients of all three with respect to every parameter, against smart_step_in_float64 from
    the same random start ν.

    σ, η and ε are large next to the paper's (the tiny model's word embeddings are N(0, 1)), so
    that f(x̃) − f(x) is large next to float32's rounding: δ then agrees to 1e-4 ε, the values to
    2e-5 and each parameter's gradient to 5e-4 (measured: 2e-5 ε, 5e-6 and 1e-4, the last where
    R_s's two sides nearly cancel, as for the last LayerNorm's bias). At the paper's ε = 1e-5,
    R_s would be mostly rounding. η > ε: the steepest coordinates end on the ε-ball's boundary."""
    sigma, step_size, eps, lambda_s, mu = 0.1, 0.5, 0.3, 3.0, 0.5
    model = tiny_model()
    regulariser = SmartRegulariser(model, lambda_s=lambda_s, eps=eps, sigma=sigma, step_size=step_size, n_steps=1,
                                   mu=mu)
    nudge(model)  # θ ≠ θ̃: D_Breg and its gradient are not 0
    inputs = batches[task]["inputs"]
    model64, teacher64 = copy.deepcopy(model).double().eval(), copy.deepcopy(regulariser.teacher).double()
    torch.manual_seed(11)  # ν as smart.py draws it: randn_like(x) * σ in float32, one x per input, in order
    hidden = model.encoder.config.hidden_size
    noise = [(torch.randn(*enc["input_ids"].shape, hidden) * sigma).double() for enc in inputs]
    r_s64, d_breg64, deltas64 = smart_step_in_float64(model64, teacher64, task, inputs, noise, step_size, eps)
    names, params64 = zip(*model64.named_parameters())
    r_s_grads64 = torch.autograd.grad(r_s64, params64, retain_graph=True, allow_unused=True)
    d_breg_grads64 = torch.autograd.grad(d_breg64, params64, allow_unused=True)

    # the ascent: δ after one projected step, some coordinates on the ball's boundary and some inside
    with dropout_off(model):
        x = word_embeddings(model, inputs)
        clean = model(task, inputs, embeds=x)
        torch.manual_seed(11)
        deltas = adversarial_perturbation(model, task, inputs, x, clean, sigma, step_size, eps, n_steps=1)
    for delta, delta64, enc in zip(deltas, deltas64, inputs):
        torch.testing.assert_close(delta.double(), delta64, rtol=0, atol=1e-4 * eps)
        real_tokens = delta64[enc["attention_mask"].bool()].abs()
        assert (real_tokens == eps).any() and (real_tokens < eps).any()

    # R_s (eq. 3) and D_Breg (eq. 5), each with its gradient
    params = [p for _, p in model.named_parameters()]
    torch.manual_seed(11)
    r_s, d_breg = regulariser.terms(task, inputs)
    assert r_s.item() == pytest.approx(r_s64.item(), rel=2e-5)
    assert d_breg.item() == pytest.approx(d_breg64.item(), rel=2e-5)
    r_s_grads = torch.autograd.grad(r_s, params, retain_graph=True, allow_unused=True)
    assert_close_gradients(r_s_grads, r_s_grads64, names, 5e-4)
    assert_close_gradients(torch.autograd.grad(d_breg, params, allow_unused=True), d_breg_grads64, names, 5e-4)

    # what train.py adds to the task loss: λ_s R_s + μ D_Breg, and its gradient
    torch.manual_seed(11)
    total = regulariser({task: batches[task]})
    total.backward()
    assert total.item() == pytest.approx(lambda_s * r_s64.item() + mu * d_breg64.item(), rel=2e-5)
    expected = [None if r is None else lambda_s * r + mu * d for r, d in zip(r_s_grads64, d_breg_grads64)]
    assert_close_gradients([p.grad for p in params], expected, names, 5e-4)


# ----------------------------------------------------------------------------- the teacher

def test_teacher_starts_as_a_frozen_copy_outside_the_model(batches):
    model = tiny_model()
    regulariser = SmartRegulariser(model, **PAPER)
    model_params = {id(p) for p in model.parameters()}
    teacher_params = list(regulariser.teacher.parameters())
    assert len(teacher_params) == len(model_params)
    assert not any(id(t) in model_params for t in teacher_params)
    assert not any(t.requires_grad for t in teacher_params)
    for t, p in zip(teacher_params, model.parameters()):
        assert torch.equal(t, p) and t.data_ptr() != p.data_ptr()
    _, d_breg = regulariser.terms("sst", batches["sst"]["inputs"])
    assert d_breg.item() == 0.0  # f(x; θ) = f(x; θ̃) at the start, dropout off


def test_teacher_update_follows_eq_6():
    model = tiny_model()
    beta = 0.9
    regulariser = SmartRegulariser(model, **{**PAPER, "beta": beta})
    expected = [t.detach().double().clone() for t in regulariser.teacher.parameters()]
    for seed in (1, 2):  # twice, so the momentum average of two different θs is checked
        nudge(model, seed=seed)
        regulariser.update_teacher()
        expected = [(1 - beta) * p.detach().double() + beta * e for p, e in zip(model.parameters(), expected)]
    for t, e in zip(regulariser.teacher.parameters(), expected):
        torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)


def test_gradients_reach_theta_and_never_the_teacher(batches):
    model = tiny_model()
    regulariser = SmartRegulariser(model, **PAPER)
    nudge(model)  # after an update θ ≠ θ̃, so D_Breg has a gradient
    loss = regulariser({task: batches[task] for task in ("sst", "para", "sts")})
    loss.backward()
    grads = dict(model.named_parameters())
    for name in ("encoder.embeddings.word.weight", "encoder.layers.0.attention.qkv.weight",
                 "heads.sst.weight", "heads.para.weight"):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    assert grads["heads.cfimdb.weight"].grad is None  # not in this step
    assert all(t.grad is None for t in regulariser.teacher.parameters())


def test_regulariser_is_finite_for_every_task_and_sums_over_the_steps_tasks(batches):
    model = tiny_model()
    regulariser = SmartRegulariser(model, **{**PAPER, "lambda_s": 3.0, "sigma": 1e-3, "eps": 1e-3})
    nudge(model)
    torch.manual_seed(5)
    one_task_steps = [regulariser({task: batches[task]}) for task in tasks.TASKS]
    torch.manual_seed(5)  # the same noise draws, in the same task order
    multi_task_step = regulariser(batches)
    for value in one_task_steps + [multi_task_step]:
        assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    torch.testing.assert_close(multi_task_step, sum(one_task_steps))


def test_regulariser_is_lambda_r_s_plus_mu_d_breg(batches):
    model = tiny_model()
    regulariser = SmartRegulariser(model, **{**PAPER, "lambda_s": 3.0, "mu": 0.5, "sigma": 1e-3, "eps": 1e-3})
    nudge(model)
    torch.manual_seed(5)
    r_s, d_breg = regulariser.terms("para", batches["para"]["inputs"])
    torch.manual_seed(5)
    torch.testing.assert_close(regulariser({"para": batches["para"]}), 3.0 * r_s + 0.5 * d_breg)


def test_dropout_is_off_inside_and_each_modules_mode_is_restored(batches):
    model = tiny_model()
    model.encoder.layers[0].eval()  # a submodule in its own mode must keep it
    regulariser = SmartRegulariser(model, **{**PAPER, "sigma": 0.0, "n_steps": 0})
    r_s, _ = regulariser.terms("sst", batches["sst"]["inputs"])
    assert r_s.item() == 0.0  # no perturbation and no dropout: f(x̃) = f(x) exactly
    assert model.training and model.encoder.training and not model.encoder.layers[0].training


# ----------------------------------------------------------------------------- resuming

def test_state_dict_round_trips_through_torch_load_weights_only():
    model = tiny_model()
    regulariser = SmartRegulariser(model, **PAPER)
    nudge(model)
    regulariser.update_teacher()
    buffer = io.BytesIO()
    torch.save(regulariser.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = SmartRegulariser(tiny_model(seed=1), **PAPER)
    restored.load_state_dict(state)
    for a, b in zip(restored.teacher.parameters(), regulariser.teacher.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="same --tasks"):
        SmartRegulariser(tiny_model(tasks_=["sst"]), **PAPER).load_state_dict(state)


def test_bad_hyperparameters_are_refused():
    for bad in ({"eps": 0.0}, {"beta": 1.0}, {"n_steps": -1}, {"lambda_s": -1.0}):
        with pytest.raises(ValueError, match="SMART needs"):
            SmartRegulariser(tiny_model(), **{**PAPER, **bad})
