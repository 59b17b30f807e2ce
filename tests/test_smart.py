"""Specification of smart.py (Jiang et al., 2020): l_s against its definition in float64, the
projected ascent against the ε-ball, R_s against smart-pytorch's SMARTLoss, the teacher against
eq. 6, and the regulariser on a tiny real BertModel with real sentences of all four tasks.

`python tests/test_smart.py` also times a training step with and without SMART on the real
default checkpoint (prints, asserts nothing)."""
import io
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from smart_pytorch import SMARTLoss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `python tests/test_smart.py`
import tasks  # noqa: E402
from bert import BertConfig, BertModel  # noqa: E402
from smart import (SmartRegulariser, adversarial_perturbation, ascent_step, class_logits,  # noqa: E402
                   smoothness_loss, symmetric_kl, word_embeddings)
from tokenizer import BertTokenizer  # noqa: E402

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
PAPER = dict(lambda_s=1.0, eps=1e-5, sigma=1e-5, step_size=1e-3, n_steps=1, mu=1.0, beta=0.99)


def real_batches(data_dir, checkpoint_dir, n=4, max_length=32, split="dev"):
    """{task: {'inputs': [...], 'labels': ...}}: the first n dev examples, batched as train.py does."""
    tokenizer = BertTokenizer.from_pretrained(checkpoint_dir)
    batches = {}
    for task in tasks.TASKS:
        data = tasks.TaskData(task, tasks.read_examples(data_dir, task, split)[:n], tokenizer, max_length)
        batches[task] = data.batch(list(range(n)))
    return batches


@pytest.fixture(scope="module")
def batches(data_dir, checkpoint_dir):
    return real_batches(data_dir, checkpoint_dir)


def tiny_model(seed=0, tasks_=tasks.TASKS):
    torch.manual_seed(seed)
    return tasks.MultitaskBert(BertModel(BertConfig(**TINY)), tasks_, dropout=0.1)


def nudge(model, scale=0.05, seed=1):
    """Move every parameter a little, as an optimizer step would (the teacher stays behind)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


# ----------------------------------------------------------------------------- l_s

def symmetric_kl_from_definition(p_logits, q_logits):
    p = p_logits.exp() / p_logits.exp().sum(-1, keepdim=True)
    q = q_logits.exp() / q_logits.exp().sum(-1, keepdim=True)
    kl_pq = (p * (p / q).log()).sum(-1)
    kl_qp = (q * (q / p).log()).sum(-1)
    return (kl_pq + kl_qp).mean()


def test_symmetric_kl_equals_its_definition_in_value_and_gradients():
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    q = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    ours, direct = symmetric_kl(p, q), symmetric_kl_from_definition(p, q)
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
    sigma = 1.0  # the tiny model is smooth: a large σ keeps R_s far from 0, so 1e-6 is a real check
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
    assert abs(r_s.item() - expected.item()) < 1e-6


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


# ----------------------------------------------------------------------------- cost (python tests/test_smart.py)

def training_step(model, optimizer, batch, regulariser=None):
    """Seconds for forward + backward + AdamW step (+ teacher update) on one SST batch."""
    from losses import cross_entropy_loss
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = cross_entropy_loss(model("sst", batch["inputs"]), batch["labels"])
    if regulariser is not None:
        loss = loss + regulariser({"sst": batch})
    loss.backward()
    optimizer.step()
    if regulariser is not None:
        regulariser.update_teacher()
    return time.perf_counter() - started


def measure_cost(batch, n_steps=10):
    """Median step time without and with SMART (paper defaults, K = 1) on the real checkpoint.
    Steps alternate, so a machine shared with other jobs slows both alike."""
    from bert import default_checkpoint_path
    torch.manual_seed(0)
    model = tasks.MultitaskBert(BertModel.from_pretrained(default_checkpoint_path()), ["sst"], dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    regulariser = SmartRegulariser(model, **PAPER)
    plain, smart = [], []
    for step in range(n_steps + 1):  # step 0 warms up
        t_plain, t_smart = training_step(model, optimizer, batch), training_step(model, optimizer, batch, regulariser)
        if step:
            plain.append(t_plain)
            smart.append(t_smart)
    terms = [t.item() for t in regulariser.terms("sst", batch["inputs"])]
    return statistics.median(plain), statistics.median(smart), terms


if __name__ == "__main__":
    from bert import default_checkpoint_path
    from conftest import DATA_DIR
    batch = real_batches(DATA_DIR, default_checkpoint_path(), n=8, max_length=128, split="train")["sst"]
    plain, smart, (r_s, d_breg) = measure_cost(batch)
    print(f"SST batch of 8 train sentences, all-MiniLM-L6-v2, {torch.get_num_threads()} threads, median of 10 steps")
    print(f"  without SMART {plain * 1000:.0f} ms/step, with SMART (K=1) {smart * 1000:.0f} ms/step, "
          f"ratio {smart / plain:.2f}")
    print(f"  after 20 steps at the paper's defaults: R_s = {r_s:.3g}, D_Breg = {d_breg:.3g}")
