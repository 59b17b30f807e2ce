"""Specification of bench.py: it times the batches train.py would make, its contenders take turns
batch by batch, a batch's time is its median round, and `--quick` runs end to end.
(The numbers themselves come from running it by hand: `python bench.py`.)"""
import random
import statistics

import pytest
import torch

import bench
from tokenizer import BertTokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sst_and_quora(data_dir):
    return [bench.task_data(str(data_dir), task, 1000) for task in ("sst", "para")]


def test_batches_are_full_and_bucketed_by_length(sst_and_quora):
    for data in sst_and_quora:
        batches = bench.bucketed_indices(data, batch_size=8, n_batches=20)
        assert [len(b) for b in batches] == [8] * 20
        assert len({i for b in batches for i in b}) == 8 * 20  # no example twice
        shuffled = random.Random(0).sample(range(len(data)), 8 * 20)
        unbucketed = [shuffled[k:k + 8] for k in range(0, len(shuffled), 8)]

        def spread(batch):
            return max(data.lengths[i] for i in batch) - min(data.lengths[i] for i in batch)
        # what bucketing is for: within a batch, lengths are far closer than in random batches
        assert statistics.mean(map(spread, batches)) < statistics.mean(map(spread, unbucketed)) / 4


def test_encoder_batches_alternate_sst_and_quora_each_padded_to_its_longest(sst_and_quora):
    sst, quora = sst_and_quora
    batches = bench.encoder_batches(sst_and_quora, batch_size=8, n_batches=6)
    assert [b["input_ids"].shape[0] for b in batches] == [8] * 6
    assert [bool(b["token_type_ids"].any()) for b in batches] == [False, True] * 3  # Quora's are pairs
    for b in batches:  # padded to its own longest, not to 128: some row has no padding at all
        assert b["attention_mask"].sum(1).max().item() == b["input_ids"].shape[1]
    first_quora = quora.batch(bench.bucketed_indices(quora, 8, 6)[0])["inputs"][0]  # TaskData's own batch
    assert all(torch.equal(batches[1][k], first_quora[k]) for k in first_quora)


def test_naive_collate_feeds_the_same_ids_as_ours_padded_to_128(sst_and_quora, checkpoint_dir):
    sst = sst_and_quora[0]
    indices = bench.bucketed_indices(sst, 8, 1)[0]
    ours = sst.batch(indices)
    naive = bench.naive_collate([sst.examples[i] for i in indices], BertTokenizer.from_pretrained(checkpoint_dir))
    for name, ours_field in ours["inputs"][0].items():
        naive_field, length = naive["inputs"][0][name], ours_field.shape[1]
        assert naive_field.shape == (8, 128)
        assert torch.equal(naive_field[:, :length], ours_field) and not naive_field[:, length:].any()
    assert torch.equal(naive["labels"], ours["labels"])


def test_contenders_take_turns_on_every_item_after_one_warm_up_call_each():
    calls = []
    bench.time_in_turns({"a": lambda item: calls.append(("a", item)), "b": lambda item: calls.append(("b", item))},
                        items=["x", "y"], rounds=3, device=CPU)
    assert calls == [("a", "x"), ("b", "x")] + [("a", "x"), ("b", "x")] * 3 + [("a", "y"), ("b", "y")] * 3


def test_time_is_the_mean_over_items_of_each_items_median_round(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    # seconds per call: the warm-up, then three rounds on item 0 and three on item 1
    durations = {"a": iter([100, 9, 1, 3, 2, 9, 4]), "b": iter([100, 1, 1, 1, 10, 40, 10])}

    def contender(name):
        def call(item):
            clock[0] += next(durations[name])
        return call
    seconds = bench.time_in_turns({name: contender(name) for name in durations}, items=[0, 1], rounds=3, device=CPU)
    assert seconds == pytest.approx({"a": (3 + 4) / 2, "b": (1 + 10) / 2})  # medians; means would give 4.7 and 10.5


def test_table_gives_each_time_as_a_multiple_of_the_first_rows(capsys):
    bench.print_table("t", {"reference": 0.2, "ours": 0.05, "slower": 0.5}, "step")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:]]
    assert rows == [["reference", "200.0", "1.00x"], ["ours", "50.0", "0.25x"], ["slower", "500.0", "2.50x"]]


def test_bad_flags_exit_with_status_2():
    for argv in (["--only", "encoder,memory"], ["--threads", "0"], ["--rounds", "0"], ["--quick=yes"]):
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(argv)
        assert exit_.value.code == 2


STEP_ROWS = {  # by what --precision auto picks on this CPU: bf16 where it is native, else fp32
    "bf16": ["fp32, eager update (the defaults before)", "bf16 autocast, eager update",
             "bf16 autocast, fused update (train.py's default)", "bf16 matmul of the FFN's shape, same tokens (the limit)"],
    "fp32": ["fp32, eager update", "fp32, fused update (train.py's default here)",
             "fp32 matmul of the FFN's shape, same tokens (the limit)"]}


def quick_tables(data_dir, capsys, sections):
    """The tables `bench.py --quick` prints for `sections` (one round, one thread, no memory
    column), each as its lines."""
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--rounds", "1", "--threads", "1", "--data_dir", str(data_dir), "--no_memory",
                    "--only", sections])
    finally:
        torch.set_num_threads(threads)
    return [t.splitlines() for t in capsys.readouterr().out.split("\n\n")[1:]]


def contenders_of(table):
    return [line.split("  ")[1].strip() for line in table[2:]]


def test_quick_run_prints_each_tables_contenders_reference_first(data_dir, capsys):
    # without the memory column, which starts a process per row (tested below); the optimizer and
    # epoch tables are left out: compiling fused=True, and whole runs, take longer than the rest
    tables = quick_tables(data_dir, capsys, "encoder,tokenizer,data,smart,step")
    assert list(map(contenders_of, tables)) == [["transformers sdpa", "ours", "transformers eager"]] * 2 + [
        ["transformers slow", "ours, cold cache", "transformers fast"],
        ["naive (tokenise per batch, pad to 128)", "ours (ids padded once, on the device; a batch is its rows)"],
        ["without SMART", "with SMART (K = 1)"],
        STEP_ROWS[bench.train.native_precision(CPU)]]
    assert all(" 1.00x" in t[2] for t in tables)
    step = tables[-1]
    assert step[1].split()[-4:] == ["TFLOP/s", "of", "the", "last"] and step[-1].endswith(" 100%")


def test_where_bf16_is_not_native_the_step_table_is_float32_beside_a_float32_matmul(data_dir, capsys, monkeypatch):
    monkeypatch.setattr(bench.train, "native_precision", lambda device: "fp32")  # as on a CPU with AVX2 only
    (table,) = quick_tables(data_dir, capsys, "step")
    assert table[0].endswith("beside a fp32 matmul")
    assert contenders_of(table) == STEP_ROWS["fp32"]


def test_the_flop_counter_counts_a_linear_layers_matmul_forward_and_backward():
    layer = torch.nn.Linear(384, 1536)
    x = torch.randn(100, 384, requires_grad=True)
    flops = bench.counted_flops(lambda x: layer(x).sum().backward(), x)
    assert flops == 3 * 2 * 100 * 384 * 1536  # forward, and the gradients of x and of the weight


def test_peak_memory_of_a_call_counts_what_it_allocates_and_holds():
    held = []
    peak = bench.peak_memory_of(lambda n: held.append(torch.ones(n, dtype=torch.uint8)), 64 * 2**20, CPU)
    assert 128 * 2**20 <= peak < 160 * 2**20  # two calls, 64 MiB each, both held; a little else


def test_a_whole_runs_peak_memory_is_its_own_not_its_parents():
    """The epoch table's column: a child holding 200 MiB peaks at 200 MiB and a bit, and one
    holding nothing peaks at a Python's few MiB, though this process holds 300 MiB when it forks."""
    import subprocess
    import sys
    held = b"\x01" * (300 * 2**20)  # written, so resident (a bytearray of zeros would not be)
    child = "import time; x = b'\\x01' * ({} * 2**20); time.sleep(1)"  # 20 polls at least, on a busy machine
    peaks = [bench.wait_for_peak_memory(subprocess.Popen([sys.executable, "-c", child.format(n)])) for n in (200, 0)]
    assert peaks[0][0] == peaks[1][0] == 0 and len(held) == 300 * 2**20
    assert 200 <= peaks[0][1] < 260 and peaks[1][1] < 60


def test_a_rows_memory_is_measured_in_a_fresh_process_set_up_as_its_table(data_dir):
    """What fills the peak-MiB column: bench.py run again for one section, measuring one contender."""
    args = bench.parse_args(["--quick", "--data_dir", str(data_dir)])
    mib = bench.peak_memory_in_a_fresh_process(args, "tokenizer", "2. tokenizer", "ours, cold cache")
    assert 0 <= mib < 1024  # token ids of 1000 sentences and the word cache: a few MiB, not a model
    # AdamW's first step allocates its two moments, 2 x 22.7M floats (173 MiB), on top of the
    # set-up's three copies of the model: the probe sees the moments and not the set-up (measured
    # 223 MiB: the moments and the eager update's temporaries)
    mib = bench.peak_memory_in_a_fresh_process(args, "optimizer", "3. optimizer", "optim.AdamW")
    assert 173 <= mib < 400
