"""losses.py: task losses against torch.nn.functional, and the combining strategies against their
plain formulas (eq. 1, 7, 8) in float64, values and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (LOSS_FLOOR, binary_cross_entropy_loss, combine_losses, cross_entropy_loss,
                    focused_loss, geometric_mean_loss, similarity_mse_loss, sum_loss)

# One step's task losses at realistic early-training values: SST 5-way CE near log 5,
# PARA BCE near log 2, STS MSE on the scaled cosine well below 1.
STEP_LOSSES = {"sst": 1.52, "para": 0.61, "sts": 0.083}


def leaf_losses(values=STEP_LOSSES):
    """{task: float64 scalar leaf tensor requiring grad}."""
    return {task: torch.tensor(value, dtype=torch.float64, requires_grad=True)
            for task, value in values.items()}


def gradients(output, losses):
    return dict(zip(losses, torch.autograd.grad(output, list(losses.values()))))


# ---------------------------------------------------------------------------------------------
# Task losses

def test_cross_entropy_loss_matches_torch_for_sst_and_cfimdb():
    generator = torch.Generator().manual_seed(0)
    for n_classes in (5, 2):
        logits = torch.randn(8, n_classes, generator=generator)
        labels = torch.randint(0, n_classes, (8,), generator=generator)
        torch.testing.assert_close(cross_entropy_loss(logits, labels),
                                   F.cross_entropy(logits, labels))


def test_binary_cross_entropy_loss_matches_torch_for_int_and_float_labels():
    logit = torch.tensor([2.3, -0.7, 0.1, -4.0, 35.0])
    labels = torch.tensor([1, 0, 1, 1, 0])
    expected = F.binary_cross_entropy_with_logits(logit, labels.float())
    torch.testing.assert_close(binary_cross_entropy_loss(logit, labels), expected)
    torch.testing.assert_close(binary_cross_entropy_loss(logit, labels.float()), expected)
    torch.testing.assert_close(binary_cross_entropy_loss(logit[:, None], labels), expected)


def test_binary_cross_entropy_loss_is_finite_for_confident_wrong_predictions():
    logit = torch.tensor([100.0, -100.0], requires_grad=True)
    loss = binary_cross_entropy_loss(logit, torch.tensor([0, 1]))
    loss.backward()
    assert math.isclose(loss.item(), 100.0, rel_tol=1e-6)  # log(1 + e^100) ~= 100, not inf
    torch.testing.assert_close(logit.grad, torch.tensor([0.5, -0.5]))  # (sigmoid(z) - y) / n, not nan


def test_similarity_mse_loss_is_mse_between_scaled_cosine_and_score():
    cosine = torch.tensor([0.95, 0.10, -0.20, 0.55])
    scores = torch.tensor([4.8, 0.4, 0.0, 3.0])
    torch.testing.assert_close(similarity_mse_loss(cosine, scores),
                               F.mse_loss(5 * cosine, scores))
    assert similarity_mse_loss(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([5.0, 0.0, 2.5])).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Combining strategies: values

def test_sum_is_sum_of_task_losses():
    assert math.isclose(sum_loss(leaf_losses()).item(), sum(STEP_LOSSES.values()), rel_tol=1e-12)


def test_gls_is_geometric_mean_of_task_losses():
    expected = math.prod(STEP_LOSSES.values()) ** (1 / len(STEP_LOSSES))
    assert math.isclose(geometric_mean_loss(leaf_losses()).item(), expected, rel_tol=1e-12)


def test_gls_of_one_task_is_that_task_loss():
    assert math.isclose(geometric_mean_loss(leaf_losses({"sts": 0.083})).item(), 0.083,
                        rel_tol=1e-12)


def test_rescaling_one_task_loss_only_rescales_gls():
    # (c L_1 L_2 L_3)^(1/3) = c^(1/3) GLS: rescaling one task's loss only rescales GLS
    scaled = dict(STEP_LOSSES, sts=STEP_LOSSES["sts"] * 8)
    ratio = geometric_mean_loss(leaf_losses(scaled)) / geometric_mean_loss(leaf_losses())
    assert math.isclose(ratio.item(), 2.0, rel_tol=1e-12)


def test_fls_is_gls_times_geometric_mean_of_focused_losses():
    gls = math.prod(STEP_LOSSES.values()) ** (1 / 3)
    focused = (STEP_LOSSES["para"] * STEP_LOSSES["sts"]) ** (1 / 2)
    assert math.isclose(focused_loss(leaf_losses(), ("para", "sts")).item(), gls * focused,
                        rel_tol=1e-12)
    assert math.isclose(focused_loss(leaf_losses(), ["para"]).item(), gls * STEP_LOSSES["para"],
                        rel_tol=1e-12)


def test_fls_accepts_a_single_task_name_as_focus():
    by_name = focused_loss(leaf_losses(), "para")
    assert by_name.item() == focused_loss(leaf_losses(), ("para",)).item()


def test_fls_counts_only_focused_tasks_present_in_the_step():
    # 'sts' is focused but absent this step: the focus factor is PARA's alone
    step = {"sst": 1.52, "para": 0.61}
    expected = (1.52 * 0.61) ** (1 / 2) * 0.61
    assert math.isclose(focused_loss(leaf_losses(step), ("para", "sts")).item(), expected,
                        rel_tol=1e-12)


def test_fls_without_focused_tasks_in_the_step_is_gls():
    # the sequential sampler's SST step: one task, not focused -> FLS = GLS = L_sst
    sst_step = leaf_losses({"sst": 1.52})
    assert focused_loss(sst_step, ("para",)).item() == geometric_mean_loss(sst_step).item() == 1.52
    assert (focused_loss(leaf_losses(), ()).item()
            == geometric_mean_loss(leaf_losses()).item())


def test_fls_of_a_lone_focused_task_is_its_loss_squared():
    # the sequential sampler's PARA step with focus=('para',)
    assert math.isclose(focused_loss(leaf_losses({"para": 0.61}), ("para",)).item(), 0.61 ** 2,
                        rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# Combining strategies: gradients against the closed forms

def test_sum_gradient_is_one_for_every_task():
    losses = leaf_losses()
    assert all(grad.item() == 1.0 for grad in gradients(sum_loss(losses), losses).values())


def test_gls_gradient_is_gls_over_n_times_task_loss():
    # dGLS/dL_i = GLS / (n L_i)
    losses = leaf_losses()
    gls = geometric_mean_loss(losses)
    for task, grad in gradients(gls, losses).items():
        expected = gls.item() / (len(losses) * STEP_LOSSES[task])
        assert math.isclose(grad.item(), expected, rel_tol=1e-12), task


def test_fls_gradient_matches_closed_form():
    # log FLS = (1/n) sum_i log L_i + (1/|F|) sum_{j in F} log L_j, so
    # dFLS/dL_k = FLS * (1/(n L_k) + [k in F] / (|F| L_k))
    focus = ("para", "sts")
    losses = leaf_losses()
    fls = focused_loss(losses, focus)
    for task, grad in gradients(fls, losses).items():
        in_focus = 1.0 if task in focus else 0.0
        expected = fls.item() * (1 / (3 * STEP_LOSSES[task]) + in_focus / (2 * STEP_LOSSES[task]))
        assert math.isclose(grad.item(), expected, rel_tol=1e-12), task


@pytest.mark.parametrize("strategy", ["gls", "fls"])
@pytest.mark.parametrize("solved_loss", [0.0, 1e-30])
def test_loss_below_floor_is_treated_as_floor_and_gets_no_gradient(strategy, solved_loss):
    # log(0) = -inf and dGLS/dL_i = GLS / (n L_i) = inf: without the floor, NaN or inf
    losses = leaf_losses(dict(STEP_LOSSES, para=solved_loss))
    combined = combine_losses(losses, strategy, focus=("para",))
    gls = (STEP_LOSSES["sst"] * LOSS_FLOOR * STEP_LOSSES["sts"]) ** (1 / 3)
    expected = gls * LOSS_FLOOR if strategy == "fls" else gls  # FLS's focus factor is L_para alone
    assert math.isclose(combined.item(), expected, rel_tol=1e-12)
    grads = gradients(combined, losses)
    assert grads["para"].item() == 0.0
    for task in ("sst", "sts"):  # the others keep their closed-form gradient, expected / (n L_i)
        assert math.isclose(grads[task].item(), expected / (3 * STEP_LOSSES[task]), rel_tol=1e-12), task


def test_gls_works_in_float32_without_underflow():
    # a direct product of many small float32 losses underflows; the log-space mean does not
    losses = {f"task{i}": torch.tensor(1e-6) for i in range(10)}
    assert math.isclose(geometric_mean_loss(losses).item(), 1e-6, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dispatch and errors

def test_combine_losses_dispatches_on_strategy():
    losses = leaf_losses()
    assert combine_losses(losses, "sum").item() == sum_loss(losses).item()
    assert combine_losses(losses, "gls").item() == geometric_mean_loss(losses).item()
    assert combine_losses(losses, "fls").item() == focused_loss(losses, ("para",)).item()
    assert (combine_losses(losses, "fls", focus=("sts",)).item()
            == focused_loss(losses, ("sts",)).item())


def test_combine_losses_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown loss strategy 'mean'"):
        combine_losses(leaf_losses(), "mean")


def test_combining_rejects_empty_step_and_unreduced_losses():
    with pytest.raises(ValueError, match="at least one task"):
        combine_losses({}, "gls")
    with pytest.raises(ValueError, match="'sst' has shape \\(4,\\)"):
        combine_losses({"sst": torch.ones(4)}, "sum")
