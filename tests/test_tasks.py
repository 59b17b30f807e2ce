"""Specification of tasks.py: reading the CS224N files, batching, the heads and the metrics."""
import pytest
import torch

import tasks
from bert import BertConfig, BertModel
from tokenizer import BertTokenizer

EXPECTED_ROWS = {  # from ../shared/data/README.md
    ("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test-student"): 2210,
    ("para", "train"): 16170, ("para", "dev"): 2021, ("para", "test-student"): 2021,
    ("sts", "train"): 6040, ("sts", "dev"): 863, ("sts", "test-student"): 1725,
    ("cfimdb", "train"): 1707, ("cfimdb", "dev"): 245, ("cfimdb", "test-student"): 488,
}


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir):
    return BertTokenizer.from_pretrained(checkpoint_dir)


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
    assert batch["labels"].dtype == torch.float


def test_sts_encodes_each_sentence_on_its_own(data_dir, tokenizer):
    data = tasks.TaskData("sts", tasks.read_examples(data_dir, "sts", "dev")[:8], tokenizer, max_length=128)
    first, second = data.batch([0, 1])["inputs"]
    assert first["input_ids"][0, :len(tokenizer.encode(data.examples[0].text))].tolist() == \
        tokenizer.encode(data.examples[0].text)
    assert second["input_ids"][1, :len(tokenizer.encode(data.examples[1].pair))].tolist() == \
        tokenizer.encode(data.examples[1].pair)


def test_para_in_both_orders_encodes_the_swapped_pair_and_scores_the_mean_logit(data_dir, tokenizer):
    examples = tasks.read_examples(data_dir, "para", "dev")[:6]
    data = tasks.TaskData("para", examples, tokenizer, max_length=128, both_orders=True)
    forward, swapped = data.batch([0, 1, 2])["inputs"]
    ids, _ = tokenizer.encode_with_types(examples[1].pair, examples[1].text, max_length=128)
    assert swapped["input_ids"][1, :len(ids)].tolist() == ids
    assert data.batch([0, 1, 2], order=0)["inputs"][0]["input_ids"].equal(forward["input_ids"])
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    model = tasks.MultitaskBert(encoder, ["para"], dropout=0.1).eval()
    with torch.no_grad():
        both = model("para", [forward, swapped])
        one, other = model("para", [forward]), model("para", [swapped])
    assert torch.allclose(both, (one + other) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(one, other)  # a cross-encoder is not symmetric by itself
    with pytest.raises(ValueError, match="both_orders is for para"):
        tasks.TaskData("sts", examples, tokenizer, max_length=128, both_orders=True)


def test_ordered_batches_cover_every_example_once(data_dir, tokenizer):
    data = tasks.TaskData("sst", tasks.read_examples(data_dir, "sst", "dev"), tokenizer, max_length=128)
    batches = data.ordered_batches(64)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))


def test_heads_output_shapes_and_sts_is_a_cosine(data_dir, tokenizer):
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    model = tasks.MultitaskBert(encoder, ["sst", "para", "sts", "cfimdb"], dropout=0.1).eval()
    expected = {"sst": (4, 5), "para": (4,), "sts": (4,), "cfimdb": (4, 2)}
    for task, shape in expected.items():
        data = tasks.TaskData(task, tasks.read_examples(data_dir, task, "dev")[:4], tokenizer, max_length=64)
        out = model(task, data.batch([0, 1, 2, 3])["inputs"])
        assert out.shape == shape
        if task == "sts":
            assert (out.abs() <= 1 + 1e-6).all()


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
