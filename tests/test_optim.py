"""Specification of optim.py: hand-written AdamW and AdaBelief take the same steps as
torch.optim.AdamW and adabelief-pytorch 0.2.1 while training a small real network (a 2-layer
BertModel on real SST token ids); fused=True runs the same update compiled; a saved state resumes
exactly; clip_grad_norm equals torch.nn.utils.clip_grad_norm_ but refuses NaN/inf gradients."""
import contextlib
import io

import adabelief_pytorch
import pytest
import torch

from bert import BertConfig, BertModel
import optim
from optim import AdaBelief, AdamW, NonFiniteGradientError, clip_grad_norm

STEPS = 100  # long enough for AdaBelief's rectified steps (from t = 6) and AMSGrad's maximum to act


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread costs more than it saves (10x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# A small real network on real token ids

@pytest.fixture(scope="module")
def sst_batch(data_dir, checkpoint_dir):
    """The first 4 SST training sentences as [CLS] words [SEP], padded to 16 tokens. Whole words
    are looked up in the checkpoint's vocab.txt ([UNK] otherwise): real ids, no tokenizer needed."""
    vocab = {word: i for i, word in enumerate(
        (checkpoint_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    rows = (data_dir / "ids-sst-train.csv").read_text(encoding="utf-8").splitlines()[1:5]
    ids = torch.zeros(4, 16, dtype=torch.long)  # [PAD] is 0
    for i, row in enumerate(rows):
        words = row.split("\t")[2].lower().split()[:14]
        tokens = ["[CLS]"] + [w if w in vocab else "[UNK]" for w in words] + ["[SEP]"]
        ids[i, :len(tokens)] = torch.tensor([vocab[t] for t in tokens])
    return ids, (ids != 0).long()


@pytest.fixture(scope="module")
def initial_weights():
    torch.manual_seed(0)
    return tiny_bert().state_dict()


def tiny_bert(weights=None):
    """The real vocabulary, everything else tiny; no dropout, so every run is deterministic."""
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if weights is not None:
        model.load_state_dict(weights)
    return model


def loss_fn(model, batch):
    """Pull the pooled [CLS] vector towards a fixed target: gradients reach every parameter."""
    ids, mask = batch
    target = torch.linspace(-0.5, 0.5, 4 * 32).view(4, 32)
    return ((model(ids, mask)["pooler_output"] - target) ** 2).mean()


def train(model, optimizer, batch, steps=STEPS):
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()


def reference_adabelief(params, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its change log and flags
        return adabelief_pytorch.AdaBelief(params, print_change_log=False, **kwargs)


def assert_same_weights(ours, reference, initial_weights):
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.pooler.weight, initial_weights["pooler.weight"])  # it did train


# ---------------------------------------------------------------------------------------------
# AdamW

@pytest.mark.parametrize("torch_options", [{"foreach": False}, {"foreach": True}],
                         ids=["foreach=False", "foreach=True"])
def test_adamw_takes_torch_adamws_steps_bit_for_bit(sst_batch, initial_weights, torch_options):
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours, reference = tiny_bert(initial_weights), tiny_bert(initial_weights)
    train(ours, AdamW(ours.parameters(), **hyper), sst_batch)
    train(reference, torch.optim.AdamW(reference.parameters(), **hyper, **torch_options), sst_batch)
    assert_same_weights(ours, reference, initial_weights)


def test_adamw_first_step_moves_each_weight_by_lr_against_its_gradient_sign():
    # m̂_1 = g and v̂_1 = g², so the first update is η g / (|g| + ε) ≈ η sign(g), whatever |g|.
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    theta.grad = torch.tensor([0.3, -0.001, 2.0, -50.0])
    AdamW([theta], lr=0.1, weight_decay=0.5).step()
    decayed = torch.tensor([1.0, -2.0, 0.5, 3.0]) * (1 - 0.1 * 0.5)  # (1 - ηλ) θ
    torch.testing.assert_close(theta.detach(), decayed - 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_parameters_without_gradient_are_skipped_like_torch(sst_batch, initial_weights):
    # The pooler gets no gradient on every third step: its step count (and so its bias
    # correction) falls behind the other parameters', exactly as in torch.
    def train_with_gaps(model, optimizer):
        for step in range(60):
            optimizer.zero_grad()
            loss_fn(model, sst_batch).backward()
            if step % 3 == 0:
                model.pooler.weight.grad = None
            optimizer.step()

    ours, reference = tiny_bert(initial_weights), tiny_bert(initial_weights)
    optimizer = AdamW(ours.parameters(), lr=1e-3)
    train_with_gaps(ours, optimizer)
    train_with_gaps(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3, foreach=False))
    assert_same_weights(ours, reference, initial_weights)
    assert optimizer.state[ours.pooler.weight]["step"] == 40
    assert optimizer.state[ours.pooler.bias]["step"] == 60


# ---------------------------------------------------------------------------------------------
# AdaBelief

@pytest.mark.parametrize("flags", [
    dict(rectify=False, weight_decay=0.0),
    dict(rectify=False, weight_decay=0.01),
    dict(rectify=True, weight_decay=0.01),
    dict(rectify=False, amsgrad=True),
    dict(rectify=True, amsgrad=True),
    dict(rectify=False, weight_decay=0.01, weight_decouple=False),
    dict(rectify=True, weight_decay=0.01, weight_decouple=False),
    dict(rectify=False, eps=1e-8),  # the recommended eps for some tasks, large enough that
    dict(rectify=True, eps=1e-8),   # where ε enters (stored in s_t, and outside the root) shows
], ids=lambda flags: ",".join(f"{k}={v}" for k, v in flags.items()))
def test_adabelief_takes_adabelief_pytorchs_steps(sst_batch, initial_weights, flags):
    ours, reference = tiny_bert(initial_weights), tiny_bert(initial_weights)
    train(ours, AdaBelief(ours.parameters(), lr=1e-3, **flags), sst_batch)
    train(reference, reference_adabelief(reference.parameters(), lr=1e-3, **flags), sst_batch)
    assert_same_weights(ours, reference, initial_weights)


def test_adabelief_defaults_are_adabelief_pytorchs_rectified_ones(sst_batch, initial_weights):
    # AdaBelief(params) is the rectified variant with ε = 1e-16 and no weight decay.
    defaults = AdaBelief([torch.nn.Parameter(torch.ones(1))]).defaults
    assert (defaults["rectify"], defaults["eps"], defaults["weight_decay"]) == (True, 1e-16, 0)
    ours, reference = tiny_bert(initial_weights), tiny_bert(initial_weights)
    train(ours, AdaBelief(ours.parameters()), sst_batch, steps=20)
    train(reference, reference_adabelief(reference.parameters()), sst_batch, steps=20)
    assert_same_weights(ours, reference, initial_weights)


def test_adabelief_steps_further_than_adam_when_the_gradient_is_consistent():
    # With a constant gradient g, m_t = (1 - β1^t) g, so the surprise g - m_t = β1^t g dies out and
    # ŝ_t falls far below g². Adam's v̂_t is g² exactly, so its step stays η m̂_t / √v̂_t = η;
    # AdaBelief's grows to η g / √ŝ_t (≈ 3.5η at t = 50).
    beta1, beta2, eps, g, lr = 0.9, 0.999, 1e-16, 2.0, 1e-3
    adam_theta, belief_theta = (torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)) for _ in range(2))
    adam = AdamW([adam_theta], lr=lr, betas=(beta1, beta2), weight_decay=0.0)
    belief = AdaBelief([belief_theta], lr=lr, betas=(beta1, beta2), eps=eps, rectify=False)
    s = 0.0
    for t in range(1, 51):
        adam_theta.grad = torch.tensor([g], dtype=torch.float64)
        belief_theta.grad = torch.tensor([g], dtype=torch.float64)
        adam_before, belief_before = adam_theta.item(), belief_theta.item()
        adam.step()
        belief.step()
        s = beta2 * s + (1 - beta2) * (beta1 ** t * g) ** 2 + eps  # s_t = β2 s_{t-1} + (1-β2)(g - m_t)² + ε
    assert belief.state[belief_theta]["exp_avg_var"].item() == pytest.approx(s, rel=1e-12)
    assert s / (1 - beta2 ** 50) < g ** 2 / 10
    assert adam_before - adam_theta.item() == pytest.approx(lr, rel=1e-6)
    assert belief_before - belief_theta.item() > 3 * lr


def test_rectified_adabelief_takes_sgd_momentum_steps_while_variance_is_unreliable():
    # ρ_t < 5 for t ≤ 5 at β2 = 0.999: θ_t = θ_{t-1} - η m̂_t, and m̂_t = g for a constant g.
    theta = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    optimizer = AdaBelief([theta], lr=0.01, rectify=True)
    g = torch.tensor([0.5, -3.0], dtype=torch.float64)
    for t in range(1, 7):
        before = theta.detach().clone()
        theta.grad = g.clone()
        optimizer.step()
        if t <= 5:
            torch.testing.assert_close(theta.detach(), before - 0.01 * g)
        else:  # step 6 is the first rectified, adaptive step
            assert not torch.allclose(theta.detach(), before - 0.01 * g)


# ---------------------------------------------------------------------------------------------
# fused=True: the same update function, compiled

@pytest.fixture(autouse=True, scope="module")
def room_for_every_variant():
    """An optimizer compiles some four variants of its update (two kinds of step, for small and
    large tensors); this module compiles many more, all of the same function."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def compilations():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def count_compiled_calls(monkeypatch, update):
    """Wrap the compiled forms of `update` (compiled already: for small and for large tensors)."""
    calls = []
    for one_thread in (True, False):
        compiled = optim._compiled[update, one_thread]
        assert compiled.__wrapped__ is update  # torch.compile of the eager function itself, no copy
        monkeypatch.setitem(optim._compiled, (update, one_thread),
                            lambda *args, compiled=compiled: calls.append(1) or compiled(*args))
    return calls


@pytest.mark.parametrize("make_optimizer, update, atol", [
    (lambda params, fused: AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused), optim.adamw_update, 1e-7),
    (lambda params, fused: AdaBelief(params, lr=1e-3, weight_decay=0.01, fused=fused), optim.adabelief_update, 1e-7),
    (lambda params, fused: AdaBelief(params, lr=1e-3, rectify=False, eps=1e-8, fused=fused),
     optim.adabelief_update, 1e-7),
    # With L2 decay a parameter with little loss gradient (a word not in the batch) has g_t ≈ λθ,
    # nearly constant: its surprise, and so √ŝ_t, is tiny and magnifies rounding differences.
    (lambda params, fused: AdaBelief(params, lr=1e-3, rectify=False, amsgrad=True, weight_decay=0.01,
                                     weight_decouple=False, fused=fused), optim.adabelief_update, 1e-6),
], ids=["AdamW", "AdaBelief", "AdaBelief,rectify=False,eps=1e-8", "AdaBelief,rectify=False,amsgrad,L2"])
def test_fused_update_is_the_same_function_compiled_once(sst_batch, initial_weights, make_optimizer, update, atol,
                                                         monkeypatch):
    # Equal up to float rounding, not bit for bit: the compiled loop may contract a*b+c into one
    # fused multiply-add, and computes in another order.
    eager, fused = tiny_bert(initial_weights), tiny_bert(initial_weights)
    train(eager, make_optimizer(eager.parameters(), fused=False), sst_batch)
    optimizer = make_optimizer(fused.parameters(), fused=True)
    optim.compile_fused_update(optimizer)  # every kind of step it takes, ahead of the first
    compiled = compilations()
    calls = count_compiled_calls(monkeypatch, update)
    train(fused, optimizer, sst_batch)
    assert compilations() == compiled  # every step t and every shape reuse the compiled code
    assert len(calls) == STEPS * len(list(fused.parameters()))  # and every update ran compiled
    assert_close_but_key_bias(fused, eager, atol)


def test_torchs_fused_adamw_is_as_far_from_eager_as_ours(sst_batch, initial_weights):
    # The tolerance above is not generous: torch's fused kernel rounds differently too, as far off.
    eager, torch_fused = tiny_bert(initial_weights), tiny_bert(initial_weights)
    train(eager, AdamW(eager.parameters(), lr=1e-3), sst_batch)
    train(torch_fused, torch.optim.AdamW(torch_fused.parameters(), lr=1e-3, fused=True), sst_batch)
    assert_close_but_key_bias(torch_fused, eager, atol=1e-7)


ADAMW_GROUP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
ADABELIEF_GROUP = dict(ADAMW_GROUP, weight_decouple=False, amsgrad=True)  # every line of adabelief_update


@pytest.mark.parametrize("group, t, kind", [
    (ADAMW_GROUP, 10, None),
    (dict(ADABELIEF_GROUP, rectify=False), 10, "adam"),
    (dict(ADABELIEF_GROUP, rectify=True), 3, "sgd"),
    (dict(ADABELIEF_GROUP, rectify=True), 10, "rectified"),
], ids=["AdamW", "AdaBelief,adam", "AdaBelief,sgd", "AdaBelief,rectified"])
def test_fused_update_computes_in_the_parameters_precision(group, t, kind):
    # In float64 the compiled step equals the eager one to float64 rounding: no number on the way
    # is rounded to float32 (as torch.compile does to the alpha of an out-of-place g.add(θ, alpha)).
    generator = torch.Generator().manual_seed(0)
    theta, g, m = (torch.randn(1000, generator=generator, dtype=torch.float64) for _ in range(3))
    v = torch.rand(1000, generator=generator, dtype=torch.float64) * 1e-2
    if kind is None:
        update, tensors, options = optim.adamw_update, [theta, g, m, v], ()
        coefficients = optim.adamw_coefficients(group, t)
    else:
        update, tensors, options = optim.adabelief_update, [theta, g, m, v, v * 2], (False, kind)  # s^max ≥ s
        step_kind, coefficients = optim.adabelief_coefficients(group, t)
        assert step_kind == kind
    eager, fused = [x.clone() for x in tensors], [x.clone() for x in tensors]
    with torch.no_grad():
        update(*eager, coefficients, *options)
        optim._apply(update, True, fused, coefficients, *options)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert not torch.equal(fused[0], theta)


def assert_close_but_key_bias(model, reference, atol):
    """Weights equal to rtol 1e-5, except the attention key bias. Its gradient is rounding noise: a
    query's scores q·(k_j + b) all shift by the same q·b, which softmax ignores. Adam divides the
    noise by its own size, so any rounding difference grows into a step of full size there."""
    hidden = model.config.hidden_size
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if name.endswith("qkv.bias"):
            a, b = (torch.cat([t[:hidden], t[2 * hidden:]]) for t in (a, b))  # query, value
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def test_fused_update_handles_a_non_contiguous_parameter():
    # A transposed weight cannot be flattened into a view: it is updated in its own shape.
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).t()
    eager, fused = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    assert not fused.is_contiguous()
    eager_optimizer, fused_optimizer = AdamW([eager], lr=0.1), AdamW([fused], lr=0.1, fused=True)
    for step in range(5):
        eager.grad = torch.linspace(-1, 1, 15).view(3, 5) * (step + 1)
        fused.grad = eager.grad.clone()
        eager_optimizer.step()
        fused_optimizer.step()
    torch.testing.assert_close(fused, eager)
    assert not torch.allclose(fused, weight)


def test_eager_optimizers_never_compile(sst_batch, initial_weights, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled"))
    monkeypatch.setattr(optim, "_compiled", {})
    for make_optimizer in (AdamW, AdaBelief):
        model = tiny_bert(initial_weights)
        train(model, make_optimizer(model.parameters()), sst_batch, steps=8)
    assert optim._compiled == {}


# ---------------------------------------------------------------------------------------------
# Resuming from a saved optimizer state

@pytest.mark.parametrize("make_optimizer", [
    lambda params: AdamW(params, lr=1e-3),
    lambda params: AdaBelief(params, lr=1e-3, weight_decay=0.01, amsgrad=True),
], ids=["AdamW", "AdaBelief"])
@pytest.mark.parametrize("through_file", [False, True], ids=["state_dict", "torch.save"])
def test_restored_optimizer_continues_bit_for_bit(sst_batch, initial_weights, make_optimizer, through_file):
    uninterrupted = tiny_bert(initial_weights)
    train(uninterrupted, make_optimizer(uninterrupted.parameters()), sst_batch, steps=100)

    first_half = tiny_bert(initial_weights)
    optimizer = make_optimizer(first_half.parameters())
    train(first_half, optimizer, sst_batch, steps=50)
    checkpoint = {"model": first_half.state_dict(), "optimizer": optimizer.state_dict()}
    if through_file:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)

    resumed = tiny_bert(checkpoint["model"])
    optimizer = make_optimizer(resumed.parameters())
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, optimizer, sst_batch, steps=50)
    for (name, a), b in zip(resumed.named_parameters(), uninterrupted.parameters()):
        assert torch.equal(a, b), name


def test_saved_state_has_torchs_and_adabelief_pytorchs_keys():
    theta = torch.nn.Parameter(torch.ones(3))
    theta.grad = torch.ones(3)
    for optimizer, keys in ((AdamW([theta]), {"step", "exp_avg", "exp_avg_sq"}),
                            (AdaBelief([theta], amsgrad=True), {"step", "exp_avg", "exp_avg_var", "max_exp_avg_var"})):
        optimizer.step()
        assert set(optimizer.state_dict()["state"][0]) == keys


def test_sparse_gradient_is_refused_with_a_clear_error():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    for make_optimizer in (AdamW, AdaBelief):
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            make_optimizer(embedding.parameters()).step()


# ---------------------------------------------------------------------------------------------
# Gradient clipping

def parameters_with_gradients(generator_seed=0):
    """Four parameters of different shapes; the third has no gradient (e.g. an unused head)."""
    generator = torch.Generator().manual_seed(generator_seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (5,), (2, 2), (7, 3)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    params[2].grad = None
    return params


@pytest.mark.parametrize("max_norm", [1.0, 100.0], ids=["above_max_norm", "below_max_norm"])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, reference = parameters_with_gradients(), parameters_with_gradients()
    total = clip_grad_norm(ours, max_norm)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(reference, max_norm))
    for a, b in zip(ours, reference):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
    # the norm is that of all gradients concatenated into one vector
    unclipped = parameters_with_gradients()
    concatenated = torch.cat([p.grad.flatten() for p in unclipped if p.grad is not None])
    torch.testing.assert_close(total, concatenated.norm())
    # after clipping the joint norm is min(‖g‖, max_norm)
    clipped_norm = torch.cat([p.grad.flatten() for p in ours if p.grad is not None]).norm()
    torch.testing.assert_close(clipped_norm.item(), min(total.item(), max_norm), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_raises_and_leaves_gradients_untouched(bad_value):
    params = parameters_with_gradients()
    params[3].grad[1, 2] = bad_value
    before = [p.grad.clone() for p in params if p.grad is not None]
    with pytest.raises(NonFiniteGradientError, match="gradient norm is"):
        clip_grad_norm(params, 1.0)
    for a, b in zip([p.grad for p in params if p.grad is not None], before):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_clip_grad_norm_without_gradients_returns_zero():
    assert clip_grad_norm([torch.nn.Parameter(torch.ones(3))], 1.0).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Arguments

@pytest.mark.parametrize("optimizer", [AdamW, AdaBelief])
@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(weight_decay=-0.1)],
                         ids=["lr", "betas", "eps", "weight_decay"])
def test_bad_hyperparameters_are_refused(optimizer, bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        optimizer([torch.nn.Parameter(torch.ones(2))], **bad)
