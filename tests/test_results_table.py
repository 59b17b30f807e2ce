"""Specification of results/table.py: every row's flags are flags train.py accepts and still run
what the row's saved run ran (results/table-runs.jsonl), and the table is read from the runs' own
files (scores.json, metrics.jsonl), rows without a run marked as such."""
import importlib.util
import json
import shlex
from pathlib import Path

import pytest

import train

spec = importlib.util.spec_from_file_location("table", Path(__file__).resolve().parent.parent / "results" / "table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)
ROWS = [row for _, rows in table.SECTIONS for row in rows]
FLAGS = table.FLAGS


@pytest.mark.parametrize("name,label,flags", ROWS, ids=[row[0] for row in ROWS])
def test_every_row_is_a_valid_train_command(name, label, flags):
    if isinstance(flags, tuple):  # ("epoch", N, other row): that row must exist and run N epochs or more,
        _, epoch, other = flags   # at a constant rate (with a schedule, epoch N of a longer run is no N-epoch run)
        other_args = train.parse_args(shlex.split(FLAGS[other]))
        assert other_args.epochs >= epoch
        assert other_args.lr_schedule == "constant"
    else:
        train.parse_args(shlex.split(flags))


SAVED_RUNS = table.read_saved_runs()


def test_every_row_with_a_run_of_its_own_has_a_saved_run():
    with_runs = [name for name, flags in FLAGS.items() if isinstance(flags, str)]
    assert sorted(r["row"] for r in SAVED_RUNS) == sorted(with_runs)


@pytest.mark.parametrize("record", SAVED_RUNS, ids=[r["row"] for r in SAVED_RUNS])
def test_every_saved_run_is_what_its_row_command_runs_today(record):
    """A default that changes after a row ran must be pinned in that row's flags."""
    flags = FLAGS[record["row"]]
    assert record["command"] == table.row_command(flags)
    today = vars(train.parse_args(shlex.split(flags)))
    assert record["args"] == {k: today.get(k, "not a flag any more") for k in record["args"]}


def test_row_names_are_unique():
    names = [name for name, _, _ in ROWS]
    assert len(names) == len(set(names))


def test_the_table_reads_finished_runs_and_marks_the_others(tmp_path):
    run = tmp_path / "main-b8"
    run.mkdir()
    history = [{"epoch": 1, "dev": {"sst": 0.4, "para": 0.7, "sts": 0.8}, "overall": 0.5, "seconds": 60.0},
               {"epoch": 2, "dev": {"sst": 0.5, "para": 0.8, "sts": 0.9}, "overall": 0.6, "seconds": 120.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (run / "scores.json").write_text(json.dumps({"dev": history[1]["dev"], "overall": 0.6, "seconds": 200.0}))
    lines = table.markdown_table(tmp_path).splitlines()
    main_row = next(line for line in lines if line.startswith("| GLS + round-robin, 3 epochs |"))
    assert "| 2 | 0.500 | 0.800 | 0.900 | 0.600 | 3.0 |" in main_row
    first_epoch = next(line for line in lines if line.startswith("| GLS + round-robin, 3 epochs: its epoch 1"))
    assert "| 1 | 0.400 | 0.700 | 0.800 | 0.500 | 1.0 |" in first_epoch
    assert sum("not run yet" in line for line in lines) == len(ROWS) - 2  # main-b8 and its epoch row
