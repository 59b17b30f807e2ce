"""Specification of bert.py: the hand-written encoder equals transformers.BertModel on the real
checkpoint and real batches, in outputs and in gradients, and the loader takes every naming
variant of released BERT checkpoints while refusing broken ones."""
import csv
import json
import re
import shutil
import struct
from dataclasses import fields

import pytest
import torch
import transformers

from bert import BertConfig, BertModel, CheckpointError, dropout, map_checkpoint_names, read_safetensors


def read_column(path, *columns, n=16):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:n]
    return [[row[c] for row in rows] for c in columns]


@pytest.fixture(scope="module")
def real_batches(data_dir, tokenizer):
    """Padded batches as the training pipeline builds them: single sentences and pairs."""
    (sst,) = read_column(data_dir / "ids-sst-dev.csv", "sentence")
    q1, q2 = read_column(data_dir / "quora-dev.csv", "sentence1", "sentence2")
    s1, s2 = read_column(data_dir / "sts-dev.csv", "sentence1", "sentence2")
    return {"sst single": tokenizer(sst), "quora pairs": tokenizer(q1, q2), "sts single": tokenizer(s1)}


@pytest.fixture(scope="module")
def ours(checkpoint_dir):
    return BertModel.from_pretrained(checkpoint_dir).eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def reference(request, checkpoint_dir):
    return transformers.BertModel.from_pretrained(str(checkpoint_dir), attn_implementation=request.param).eval()


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_outputs_match_transformers_on_real_batches(ours, reference, real_batches, attention):
    for layer in ours.layers:
        layer.attention.attention = attention
    for name, batch in real_batches.items():
        assert (batch["attention_mask"] == 0).any(), f"{name}: the batch should contain padding"
        with torch.no_grad():
            got = ours(**batch)
            want = reference(**batch)
        mask = batch["attention_mask"].bool()
        # padded positions carry no meaning, but both models compute them; compare real tokens
        torch.testing.assert_close(got["last_hidden_state"][mask], want.last_hidden_state[mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["pooler_output"], want.pooler_output, rtol=0, atol=1e-5)
    for layer in ours.layers:
        layer.attention.attention = "auto"


def test_gradients_match_transformers_for_every_parameter(checkpoint_dir, real_batches):
    ours = BertModel.from_pretrained(checkpoint_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = transformers.BertModel.from_pretrained(
        str(checkpoint_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    ours.train(), reference.train()
    batch = real_batches["quora pairs"]
    mask = batch["attention_mask"].unsqueeze(-1)

    def scalar_loss(out_hidden, out_pooled):
        # touches every parameter: pooled output and a masked mean of the hidden states
        return (out_pooled ** 2).sum() + ((out_hidden * mask).sum(1) / mask.sum(1)).pow(2).sum()

    got = ours(**batch)
    scalar_loss(got["last_hidden_state"], got["pooler_output"]).backward()
    want = reference(**batch)
    scalar_loss(want.last_hidden_state, want.pooler_output).backward()

    reference_grads, _ = map_checkpoint_names({n: p.grad for n, p in reference.named_parameters()})
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        want = reference_grads[name]
        # relative to the gradient's own scale: float32 sums in a different order differ by
        # ~1e-6 of the largest entry, which is a large *elementwise* ratio for entries near zero
        relative_error = (p.grad - want).norm() / want.norm()
        assert relative_error < 1e-4, f"{name}: relative error {relative_error:.2e}"
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=name)


def test_the_word_lookup_adds_its_gradient_into_a_kept_buffer(checkpoint_dir, real_batches):
    """With no .grad yet the table gets the usual dense gradient; once it holds a dense buffer the
    lookup's backward adds only the rows it touched into that same buffer, to the same numbers
    (the batch repeats [CLS], [SEP] and common words, and pads with token 0, whose row stays 0)."""
    model = BertModel.from_pretrained(checkpoint_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch, table = real_batches["quora pairs"], model.word_table
    assert (batch["input_ids"] == 0).any()
    handed_over = []  # the layout of what the lookup's backward gives autograd to accumulate
    table.register_hook(lambda grad: handed_over.append(grad.layout))

    def backward():
        model(**batch)["pooler_output"].pow(2).sum().backward()

    backward()
    dense = table.grad
    assert handed_over == [torch.strided] and dense.layout == torch.strided
    kept = torch.zeros_like(table)
    table.grad = kept
    backward()
    assert handed_over[1] == torch.sparse_coo  # only the touched rows...
    assert table.grad is kept and table.grad.layout == torch.strided  # ...added into the kept buffer
    torch.testing.assert_close(kept, dense, rtol=0, atol=0)
    assert not kept[0].any() and kept.abs().sum(1).gt(0).sum() == batch["input_ids"].unique().numel() - 1
    backward()  # a second backward adds to what is there, one occurrence of a token at a time: so
    # not bit-equal to adding two dense sums (0.08% of the entries differ, by at most 1.5e-7, measured)
    torch.testing.assert_close(kept, 2 * dense, rtol=0, atol=1e-5 * dense.abs().max().item())


def test_manual_attention_equals_sdpa_in_outputs_and_gradients(checkpoint_dir, real_batches):
    batch = real_batches["sst single"]
    grads = {}
    for attention in ("manual", "sdpa"):  # "sdpa" asked for: on the CPU, "auto" writes it out
        model = BertModel.from_pretrained(checkpoint_dir, attention=attention, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0)
        out = model(**batch)
        out["pooler_output"].sum().backward()
        grads[attention] = {n: p.grad for n, p in model.named_parameters()}
        grads[attention]["_out"] = out["last_hidden_state"].detach()
    # sdpa's kernel sums the softmax and the weighted values in another order: 3 of the batch's
    # 276,480 outputs differ by 1e-5 to 2e-5 on one VM here, 2 by up to 5.6e-5 on another
    # (measured), the rest by less
    torch.testing.assert_close(grads["manual"].pop("_out"), grads["sdpa"].pop("_out"), rtol=0, atol=1e-4)
    for name in grads["sdpa"]:  # summed over the batch's tokens, a gradient adds up more rounding than an output
        torch.testing.assert_close(grads["manual"][name], grads["sdpa"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_attention_is_written_out_on_the_cpu_in_every_pass(checkpoint_dir, real_batches, monkeypatch):
    """Training or not, with a gradient or without, the default never calls sdpa on the CPU (its
    backward is the slower one there); asked for, sdpa runs once a layer."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for attention, expected in (("auto", 0), ("sdpa", 1)):
        model = BertModel.from_pretrained(checkpoint_dir, attention=attention)
        for training in (True, False):
            for grad in (True, False):
                calls.clear()
                model.train(training)
                with torch.set_grad_enabled(grad):
                    model(**real_batches["sst single"])
                assert len(calls) == expected * len(model.layers), (attention, training, grad)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_zeroes_a_p_share_and_scales_the_rest_by_one_over_one_minus_p(p, dtype):
    """Each element is dropped with probability round(p * 2^16) / 2^16, independently: the share
    dropped lies within 5 binomial standard deviations of it, overall and in each of the four 16-bit
    lanes of the 64-bit draws; the rest is x / (1 - p), the gradient the same mask; eval is identity."""
    torch.manual_seed(0)
    n = 4 * 250_000
    x = torch.randn(1000, n // 1000).to(dtype).requires_grad_()
    y = dropout(x, p, training=True)
    p_q = round(p * 2**16) / 2**16
    dropped = y == 0
    sd = (p_q * (1 - p_q) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p_q) < 5 * sd
    lanes = dropped.reshape(-1, 4).float().mean(0)  # the four 16-bit quarters of each draw
    assert (lanes - p_q).abs().max().item() < 5 * sd * 2  # a lane holds n/4 draws: twice the sd
    kept = ~dropped
    scale = torch.tensor(1 / (1 - p_q), dtype=dtype)  # rounded to dtype, as the code multiplies
    torch.testing.assert_close(y[kept], x[kept] * scale.to(dtype), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.to(dtype) * scale, rtol=0, atol=0)
    assert not (dropout(x, p, training=True) == 0).equal(dropped)  # a new mask each call
    assert dropout(x, p, training=False) is x


def test_dropout_masks_follow_torch_manual_seed():
    torch.manual_seed(3)
    a = dropout(torch.ones(64, 64), 0.1, training=True)
    torch.manual_seed(3)
    b = dropout(torch.ones(64, 64), 0.1, training=True)
    assert a.equal(b)


def test_inputs_embeds_is_the_word_embedding_path(ours, real_batches):
    batch = real_batches["quora pairs"]
    with torch.no_grad():
        by_ids = ours(**batch)
        by_embeds = ours(inputs_embeds=ours.word_embeddings(batch["input_ids"]),
                         attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    torch.testing.assert_close(by_ids["last_hidden_state"], by_embeds["last_hidden_state"], rtol=0, atol=0)


def test_config_is_read_from_the_checkpoint_as_transformers_reads_it(checkpoint_dir):
    ours = BertConfig.from_json(checkpoint_dir / "config.json")
    theirs = transformers.BertConfig.from_pretrained(checkpoint_dir)
    for field in fields(BertConfig):
        if field.name != "attention":  # ours alone: which attention code runs
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


@pytest.mark.parametrize("change, complaint", [
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported"),  # tanh GELU: close, not the same
    ({"position_embedding_type": "relative_key"}, "only absolute position embeddings"),
    ({"num_attention_heads": 5}, "hidden_size 384 is not divisible by num_attention_heads 5"),
    ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob 1.0 is not a valid value"),
    ({"layer_norm_eps": 0}, "layer_norm_eps 0 is not a valid value"),
    ({"pad_token_id": 30522}, "pad_token_id 30522 is not below vocab_size 30522"),
])
def test_a_config_this_encoder_cannot_run_is_refused(checkpoint_dir, tmp_path, change, complaint):
    config = {**json.loads((checkpoint_dir / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(complaint)):
        BertConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("overrides, error, complaint", [
    ({"attention": "flash"}, ValueError, "attention 'flash': expected 'auto', 'sdpa' or 'manual'"),
    ({"hidden_dropout_prob": 1.5}, ValueError, "hidden_dropout_prob 1.5 is not a valid value"),
    ({"hidden_dropout": 0.3}, TypeError, "hidden_dropout"),  # a misspelt field is not set quietly
])
def test_an_override_the_encoder_cannot_use_is_refused(checkpoint_dir, overrides, error, complaint):
    with pytest.raises(error, match=re.escape(complaint)):
        BertModel.from_pretrained(checkpoint_dir, **overrides)


@pytest.mark.parametrize("damage, complaint", [
    (lambda state: state.update(extra=torch.zeros(3)), "unexpected weight 'extra'"),
    (lambda state: state.update({"pooler.dense.bias": torch.zeros(384, dtype=torch.int64)}), "not a float type"),
])
def test_a_weight_the_encoder_has_no_place_for_is_refused(checkpoint_dir, tmp_path, damage, complaint):
    state = read_safetensors(checkpoint_dir / "model.safetensors")
    damage(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(checkpoint_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=complaint):
        BertModel.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- loading variants

def save_bert_base_layout(checkpoint_dir, folder):
    """Re-save the MiniLM weights the way bert-base-uncased ships: pytorch_model.bin, `bert.`
    prefixes, TensorFlow-era gamma/beta LayerNorm names, and pre-training heads under `cls.`."""
    state = read_safetensors(checkpoint_dir / "model.safetensors")
    old_style = {}
    for name, tensor in state.items():
        name = "bert." + name
        if "LayerNorm.weight" in name:
            name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
        if "LayerNorm.bias" in name:
            name = name.replace("LayerNorm.bias", "LayerNorm.beta")
        old_style[name] = tensor
    old_style["cls.predictions.bias"] = torch.zeros(30522)
    old_style["cls.predictions.transform.dense.weight"] = torch.zeros(384, 384)
    old_style["cls.seq_relationship.weight"] = torch.zeros(2, 384)
    folder.mkdir()
    torch.save(old_style, folder / "pytorch_model.bin")
    shutil.copy(checkpoint_dir / "config.json", folder / "config.json")
    return folder


def test_bert_base_layout_bin_loads_to_the_same_model(checkpoint_dir, ours, tmp_path, real_batches):
    folder = save_bert_base_layout(checkpoint_dir, tmp_path / "bert-base-layout")
    model = BertModel.from_pretrained(folder).eval()
    assert sorted(model.ignored_keys) == ["cls.predictions.bias", "cls.predictions.transform.dense.weight",
                                          "cls.seq_relationship.weight"]
    for (name, a), (_, b) in zip(model.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_weight_is_an_error_naming_the_key(checkpoint_dir, tmp_path):
    state = read_safetensors(checkpoint_dir / "model.safetensors")
    del state["encoder.layer.3.intermediate.dense.bias"]
    folder = tmp_path / "missing"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    shutil.copy(checkpoint_dir / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match=r"layers\.3\.ffn_in\.bias.*missing"):
        BertModel.from_pretrained(folder)


def test_weight_that_disagrees_with_config_is_an_error(checkpoint_dir, tmp_path):
    folder = tmp_path / "wrong-config"
    folder.mkdir()
    shutil.copy(checkpoint_dir / "model.safetensors", folder / "model.safetensors")
    config = json.loads((checkpoint_dir / "config.json").read_text())
    config["intermediate_size"] = 3072
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"ffn_in\.weight.*shape \(1536, 384\).*\(3072, 384\)"):
        BertModel.from_pretrained(folder)


def write_raw_safetensors(path, header, body):
    """A .safetensors file of exactly this header and body, however wrong they are."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("header, body, complaint", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "outside the file"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "need 12"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlap"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "lacks"),
])
def test_safetensors_header_is_validated(tmp_path, header, body, complaint):
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, header, body)
    if complaint is None:
        assert read_safetensors(path)["a"].tolist() == [0.0, 0.0]
    else:
        with pytest.raises(CheckpointError, match=complaint):
            read_safetensors(path)


def test_safetensors_header_length_past_the_end_is_an_error(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="runs past the end"):
        read_safetensors(path)
