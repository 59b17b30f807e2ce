"""Specification of tasks.py: reading the CS224N files, batching, the heads and the metrics."""
import pytest
import torch

import tasks
from conftest import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

EXPECTED_ROWS = {  # from ../shared/data/README.md
    ("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test-student"): 2210,
    ("para", "train"): 16170, ("para", "dev"): 2021, ("para", "test-student"): 2021,
    ("sts", "train"): 6040, ("sts", "dev"): 863, ("sts", "test-student"): 1725,
    ("cfimdb", "train"): 1707, ("cfimdb", "dev"): 245, ("cfimdb", "test-student"): 488,
}


@pytest.mark.parametrize("task, split", sorted(EXPECTED_ROWS))
def test_every_file_reads_with_its_row_count_and_label_types(data_dir, task, split):
    examples = tasks.read_examples(data_dir, task, split)
    assert len(examples) == EXPECTED_ROWS[task, split]
    assert len({e.id for e in examples}) == len(examples)
    assert all(len(e.id) == 25 for e in examples)
    assert all((e.pair is not None) == (task in tasks.PAIR_TASKS) for e in examples)
    labels = [e.label for e in examples]
    if split == "test-student":
        assert all(label is None for label in labels)
    elif task == "sts":
        assert all(isinstance(x, float) and 0 <= x <= 5 for x in labels)
    else:
        assert set(labels) == set(range(5 if task == "sst" else 2))


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


SST_HEADER = ["", "id", "sentence", "sentiment"]


@pytest.mark.parametrize("rows, complaint", [
    ([["0", "a" * 25, "fine film", "7"]], r"ids-sst-dev.csv:2: label '7' is outside 0..4"),
    ([["0", "a" * 25, "fine film", "x"]], r"ids-sst-dev.csv:2: could not convert"),
    ([["0", "a" * 25, "fine film", "2.5"]], r"ids-sst-dev.csv:2: label '2.5' is not a whole number"),
    ([["0", "a" * 25, "   ", "2"]], r"ids-sst-dev.csv:2: empty sentence"),
    ([["0", "a" * 25, "fine film"]], r"ids-sst-dev.csv:2: expected 4 tab-separated fields"),
    ([["0", "a" * 25, "fine film", "2", "extra"]], r"ids-sst-dev.csv:2: expected 4 tab-separated fields"),
    ([["0", "a" * 25, "fine film", ""]], r"ids-sst-dev.csv:2: could not convert"),
])
def test_malformed_row_is_an_error_naming_file_and_line(tmp_path, rows, complaint):
    write_tsv(tmp_path / "ids-sst-dev.csv", SST_HEADER, rows)
    with pytest.raises(tasks.DataError, match=complaint):
        tasks.read_examples(tmp_path, "sst", "dev")


def test_empty_label_in_training_file_is_skipped_and_reported(tmp_path):
    write_tsv(tmp_path / "ids-sst-train.csv", SST_HEADER,
              [["0", "a" * 25, "fine film", "3"], ["1", "b" * 25, "dull film", ""]])
    reports = []
    examples = tasks.read_examples(tmp_path, "sst", "train", report=reports.append)
    assert [e.label for e in examples] == [3]
    assert reports == [f"{tmp_path / 'ids-sst-train.csv'}: skipped 1 row(s) with an empty label"]


def test_missing_file_and_wrong_columns_are_errors(tmp_path):
    with pytest.raises(tasks.DataError, match="data file not found"):
        tasks.read_examples(tmp_path, "sts", "train")
    write_tsv(tmp_path / "sts-train.csv", ["", "id", "sentence", "similarity"], [["0", "a" * 25, "x", "1"]])
    with pytest.raises(tasks.DataError, match="missing column.*sentence1, sentence2"):
        tasks.read_examples(tmp_path, "sts", "train")


def test_batches_are_padded_to_their_own_longest(data_dir, tokenizer):
    data = tasks.TaskData("para", tasks.read_examples(data_dir, "para", "dev")[:40], tokenizer, max_length=128)
    indices = [3, 7, 11]
    batch = data.batch(indices)
    (enc,) = batch["inputs"]
    assert enc["input_ids"].shape[1] == max(data.lengths[i] for i in indices)
    for row, i in enumerate(indices):
        ids, types = tokenizer.encode_with_types(data.examples[i].text, data.examples[i].pair, max_length=128)
        assert enc["input_ids"][row, :len(ids)].tolist() == ids
        assert enc["token_type_ids"][row, :len(ids)].tolist() == types
        assert enc["attention_mask"][row].sum() == len(ids)
        assert (enc["input_ids"][row, len(ids):] == tokenizer.pad_token_id).all()
    assert batch["labels"].dtype == torch.float  # binary_cross_entropy_loss takes float labels
    assert batch["labels"].tolist() == [data.examples[i].label for i in indices]


def test_a_split_and_its_batches_live_on_its_device(data_dir, tokenizer):
    """What a GPU step relies on: every tensor of a batch is on the data's device, made there from
    the split's tensors (only the row numbers come from the host). The meta device (shapes, no
    data) stands in for a GPU: a tensor left on the CPU would show."""
    for task in ("sst", "para", "sts"):
        examples = tasks.read_examples(data_dir, task, "dev")[:40]
        on_cpu = tasks.TaskData(task, examples, tokenizer, max_length=128).batch([3, 7, 11])
        on_meta = tasks.TaskData(task, examples, tokenizer, max_length=128, device="meta").batch([3, 7, 11])
        for cpu, meta in zip(on_cpu["inputs"], on_meta["inputs"]):
            for key in cpu:
                assert meta[key].device.type == "meta" and meta[key].shape == cpu[key].shape
                assert meta[key].dtype == cpu[key].dtype == torch.long
        assert on_meta["labels"].device.type == "meta" and on_meta["labels"].shape == on_cpu["labels"].shape
        assert on_meta["labels"].dtype == on_cpu["labels"].dtype == (torch.long if task == "sst" else torch.float)
        assert on_meta["rows"].device.type == "meta" and on_cpu["rows"].tolist() == [3, 7, 11]


def test_sts_encodes_each_sentence_on_its_own(data_dir, tokenizer):
    data = tasks.TaskData("sts", tasks.read_examples(data_dir, "sts", "dev")[:8], tokenizer, max_length=128)
    batch = data.batch([0, 1])
    for enc, side in zip(batch["inputs"], ("text", "pair")):
        for row in (0, 1):
            ids = tokenizer.encode(getattr(data.examples[row], side))
            assert enc["input_ids"][row, :len(ids)].tolist() == ids
            assert enc["attention_mask"][row].sum() == len(ids)
            assert (enc["token_type_ids"][row] == 0).all()
    assert batch["labels"].equal(torch.tensor([data.examples[0].label, data.examples[1].label]))


def test_ordered_batches_cover_every_example_once_shortest_first(data_dir, tokenizer):
    data = tasks.TaskData("sst", tasks.read_examples(data_dir, "sst", "dev"), tokenizer, max_length=128)
    batches = data.ordered_batches(64)
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(len(data)))
    assert [len(b) for b in batches] == [64] * (len(data) // 64) + [len(data) % 64]  # 1101 = 17 * 64 + 13
    lengths = [data.lengths[i] for i in order]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_to_a_multiple_of_16_changes_the_shapes_not_the_outputs(data_dir, tokenizer, pooling):
    """What --compile on CUDA relies on: every batch padded to a multiple of 16 (at most
    max_length), the same ids before the padding, and every head's output the same but for
    float rounding, since the padding is masked (attention, mean pooling) or never read ([CLS])."""
    torch.manual_seed(0)
    model = tasks.MultitaskBert(tiny_bert(max_position_embeddings=128), tasks.TASKS, dropout=0.1,
                                pooling=pooling).eval()
    for task in tasks.TASKS:
        examples = tasks.read_examples(data_dir, task, "dev")[:24]
        plain = tasks.TaskData(task, examples, tokenizer, max_length=120)
        padded = tasks.TaskData(task, examples, tokenizer, max_length=120, pad_multiple=16)
        for indices in plain.ordered_batches(8):
            ours, theirs = plain.batch(indices)["inputs"], padded.batch(indices)["inputs"]
            for a, b in zip(ours, theirs):
                length, rounded = a["input_ids"].shape[1], b["input_ids"].shape[1]
                assert rounded == min(-(-length // 16) * 16, 120)
                for key in a:
                    assert b[key][:, :length].equal(a[key]) and not b[key][:, length:].any()
            with torch.no_grad():
                torch.testing.assert_close(model(task, theirs), model(task, ours), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_heads_are_linear_maps_of_the_sentence_vector_and_sts_is_a_cosine(data_dir, tokenizer, pooling):
    """Each head's output recomputed in float64 from the encoder's hidden states: the mean of the
    real tokens (or the pooler output), then the linear layer; STS the cosine of two token means."""
    encoder = tiny_bert(max_position_embeddings=128)
    model = tasks.MultitaskBert(encoder, tasks.TASKS, dropout=0.1, pooling=pooling).eval()
    expected_shapes = {"sst": (4, 5), "para": (4,), "sts": (4,), "cfimdb": (4, 2)}
    for task, shape in expected_shapes.items():
        data = tasks.TaskData(task, tasks.read_examples(data_dir, task, "dev")[:4], tokenizer, max_length=128)
        inputs = data.batch([0, 1, 2, 3])["inputs"]
        with torch.no_grad():
            out = model(task, inputs)
            encoded = [model.encoder(**enc) for enc in inputs]
        assert out.shape == shape
        mask = [enc["attention_mask"].double().unsqueeze(-1) for enc in inputs]
        assert all((m == 0).any() for m in mask)  # padding the mean must leave out
        means = [(e["last_hidden_state"].double() * m).sum(1) / m.sum(1) for e, m in zip(encoded, mask)]
        if task == "sts":
            a, b = means
            expected = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        else:
            vector = means[0] if pooling == "mean" else encoded[0]["pooler_output"].double()
            head = model.heads[task]
            expected = vector @ head.weight.double().T + head.bias.double()
            expected = expected.squeeze(-1) if task == "para" else expected
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert tasks.mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_predictions_map_outputs_to_leaderboard_values():
    assert tasks.predictions_from_outputs("sst", torch.tensor([[0.1, 3.0, 0, 0, 0]])).tolist() == [1]
    assert tasks.predictions_from_outputs("para", torch.tensor([-0.2, 0.3])).tolist() == [0, 1]
    assert tasks.predictions_from_outputs("sts", torch.tensor([-0.5, 0.5, 1.0])).tolist() == [0.0, 2.5, 5.0]


def test_pearson_r_matches_numpy():
    import numpy as np
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = 0.6 * x + y
    assert tasks.pearson_r(x.tolist(), y.tolist()) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert tasks.pearson_r([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) == 0.0


def test_accuracy_and_overall_score_follow_the_study():
    assert tasks.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert tasks.overall_score({"sst": 0.5, "para": 0.8, "sts": 0.6}) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert tasks.overall_score({"sts": -1.0}) == 0.0
