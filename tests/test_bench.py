"""Specification of bench.py's measuring tools: the batches it times are the ones it claims, the
turn-taking timer returns medians, and the memory probe sees memory that is really used.
(The benchmark itself is run by hand: `python bench.py --quick`.)"""
import os

import pytest
import torch

import bench
from tokenizer import BertTokenizer


@pytest.fixture(scope="module")
def task_datas(data_dir, checkpoint_dir):
    tokenizer = BertTokenizer.from_pretrained(checkpoint_dir)
    return [bench.load_task_data(data_dir, task, tokenizer, limit=400) for task in ("sst", "para")]


def test_pad_to_pads_short_batches_and_cuts_long_ones():
    batch = {"input_ids": torch.tensor([[101, 7, 102], [101, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    padded = bench.pad_to(batch, 5)
    assert padded["input_ids"].tolist() == [[101, 7, 102, 0, 0], [101, 102, 0, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert bench.pad_to(batch, 2)["input_ids"].tolist() == [[101, 7], [101, 102]]


def test_encoder_batches_are_full_bucketed_and_alternate_between_tasks(task_datas):
    batches = bench.encoder_batches(task_datas, batch_size=8, n_batches=6)
    assert all(b["input_ids"].shape[0] == 8 for b in batches)
    # Quora batches are pairs (token type 1 present), SST batches single sentences
    assert [bool(b["token_type_ids"].any()) for b in batches] == [False, True] * 3
    # bucketed: each batch is padded only to its own longest example
    assert all(b["attention_mask"][:, -1].any() for b in batches)
    fixed = bench.encoder_batches(task_datas, batch_size=8, n_batches=6, fixed_length=64)
    assert all(f["input_ids"].shape == (8, 64) for f in fixed)
    for b, f in zip(batches, fixed):  # the same examples
        assert torch.equal(f["input_ids"][:, :b["input_ids"].shape[1]], b["input_ids"][:, :64])


def test_time_in_turns_gives_each_contender_its_median_round():
    calls = []
    seconds = bench.time_in_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  rounds=3, device=torch.device("cpu"), warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then turns
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux's /proc")
def test_memory_peak_sees_a_tensor_that_was_freed_before_the_reading():
    device = torch.device("cpu")
    baseline = bench.reset_peak_memory(device)
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
    del x
    assert bench.peak_memory(device) - baseline >= 60 * 2**20
