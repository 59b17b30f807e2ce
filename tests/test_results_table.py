"""Specification of results/table.py: every row is a command train.py accepts, for every seed; the
saved runs (results/study-runs.jsonl) ran what their row's command runs today; the tables are read
from the runs' own files (scores.json, metrics.jsonl), else from their saved records, as seed means
with their spread; each claim compares rows and scores that exist, and its verdict follows the rule
the docstring gives; the pages hold, between their marker lines, what the saved records say."""
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


@pytest.mark.parametrize("name", list(table.FLAGS))
def test_every_row_is_a_valid_train_command_for_every_seed(name, tmp_path):
    for seed in table.seeds_of(name):
        args = train.parse_args(shlex.split(table.run_flags(name, seed, tmp_path)))
        assert args.seed == seed
        assert all(Path(t).parent == tmp_path for t in args.teachers)  # teachers: other rows' runs
    assert "{runs}" not in table.row_command(name) and "--seed" not in table.FLAGS[name]


def test_a_row_in_several_sections_is_one_command():
    for name, _, flags in ROWS:
        assert flags == table.FLAGS[name], name


def test_every_teacher_is_a_single_task_row_that_runs_before_its_students():
    order = list(table.FLAGS)
    for name in order:
        teachers = train.parse_args(shlex.split(table.run_flags(name, 1, Path("runs")))).teachers
        for folder in teachers:
            row, seed = Path(folder).name.rsplit("-seed", 1)
            assert int(seed) in table.seeds_of(row)
            assert len(train.parse_args(shlex.split(table.FLAGS[row])).tasks) == 1
            assert order.index(row) < order.index(name)


def scores_of(row):
    """The scores a row's runs have: its tasks, and "overall" (its own task's score if one task)."""
    return {*train.parse_args(shlex.split(table.run_flags(row, 1, Path("runs")))).tasks, "overall"}


@pytest.mark.parametrize("claim", table.CLAIMS, ids=[c[0] for c in table.CLAIMS])
def test_every_claim_compares_scores_its_rows_have(claim):
    _, (row_a, score_a), (row_b, score_b) = claim
    assert score_a in scores_of(row_a) and score_b in scores_of(row_b)
    assert score_a == score_b or "overall" not in (score_a, score_b)


def test_a_verdict_needs_a_difference_of_twice_its_standard_error():
    a, b = [0.50, 0.51, 0.52], [0.47, 0.48, 0.49]  # difference 0.03, standard error sqrt(2 * 1e-4 / 3) = 0.0082
    assert table.verdict(a, b) == "holds" and table.verdict(b, a) == "the other way"
    assert table.verdict([0.50, 0.52, 0.54], [0.49, 0.51, 0.53]) == "within seed noise"  # 0.01 against 0.016
    assert table.verdict([0.50], b) is None and table.verdict(a, [0.47]) is None
    assert table.verdict(a, [0.49], exact=("b",)) == "holds"  # 0.02 against sqrt(1e-4 / 3) = 0.0058


def write_run(folder, dev, overall, seconds):
    folder.mkdir(parents=True)
    record = {"epoch": 1, "dev": dev, "overall": overall, "seconds": seconds}
    (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (folder / "scores.json").write_text(json.dumps({"dev": dev, "overall": overall, "seconds": seconds + 30}))


def test_the_tables_are_seed_means_of_finished_runs_with_median_times_and_mark_the_others(tmp_path):
    for seed, sst, seconds in ((11711, 0.46, 600.0), (1, 0.48, 660.0), (2, 0.47, 1800.0)):  # seed 2: paused
        write_run(tmp_path / f"main-seed{seed}", {"sst": sst, "para": 0.84, "sts": 0.88}, sst + 0.3, seconds)
    write_run(tmp_path / "sst-alone-seed2", {"sst": 0.50}, 0.50, 120.0)
    records = table.by_run(table.runs_record(tmp_path, {}))
    lines = table.markdown_table(records).splitlines()
    main_row = next(line for line in lines if line.startswith("| AdamW (the main command) |"))
    assert "| 3 of 3 | 0.470 ± 0.010 | 0.840 ± 0.000 | 0.880 ± 0.000 | 0.770 ± 0.010 | 11.0 |" in main_row
    alone_row = next(line for line in lines if line.startswith("| SST, finetune |"))
    assert "| 1 of 3 | 0.500 | – | – | – | 2.0 |" in alone_row
    sections_with_main = sum(1 for _, rows in table.SECTIONS for name, _, _ in rows if name == "main")
    sections_with_sst_alone = sum(1 for _, rows in table.SECTIONS for name, _, _ in rows if name == "sst-alone")
    assert sum("not run yet" in line for line in lines) == len(ROWS) - sections_with_main - sections_with_sst_alone
    claims = table.claim_lines(records).splitlines()
    trails = next(line for line in claims if line.startswith("| The multi-task model trails the single-task one: SST"))
    assert "sst-alone sst: 0.500 (1) | main sst: 0.470 ± 0.010 (3) | +0.030 | not enough seeds yet |" in trails


SAVED_RUNS = table.read_records(table.STUDY_RUNS)


@pytest.mark.parametrize("record", SAVED_RUNS, ids=[f"{r['row']}-seed{r['seed']}" for r in SAVED_RUNS])
def test_every_saved_run_is_what_its_row_command_runs_today(record):
    """A default that changes after a run must be pinned in its row's flags."""
    assert record["command"] == table.row_command(record["row"]) and record["seed"] in table.seeds_of(record["row"])
    today = vars(train.parse_args(shlex.split(table.run_flags(record["row"], record["seed"], Path("runs/study")))))
    today["teachers"] = [Path(t).name for t in today["teachers"]]
    assert record["args"] == {k: today.get(k, "not a flag any more") for k in record["args"]}


def test_the_history_keeps_every_earlier_row_with_its_commit():
    records = table.read_records(table.HISTORY)
    assert records and all(len(r["commit"]) == 7 and r["best"]["dev"] for r in records)
    printed = table.history_table()
    assert all(f"| {r['commit']} | `{r['command']}` |" in printed for r in records)


def test_the_pages_show_what_the_saved_runs_say(tmp_path):
    """What `--write_pages` writes from results/study-runs.jsonl alone (no runs folder, as in a
    fresh clone) is what results/README.md and the README hold: no page shows a number its
    records do not, and no record is missing from the pages."""
    assert SAVED_RUNS  # else the saved-run tests above would be skipped, not failed
    records = table.by_run(table.runs_record(tmp_path / "no-runs", table.by_run(SAVED_RUNS)))
    for path, text in table.pages(records).items():
        assert text == path.read_text(), f"{path.name} is not what its records say: run results/table.py --write_pages"


def test_the_generated_parts_lie_between_their_markers_and_nothing_else_changes():
    page = "prose\n<!-- table.py x: begin (how) -->\nold\nrows\n<!-- table.py x: end -->\nmore prose\n"
    assert table.spliced(page, "table.py x", "new") == page.replace("old\nrows", "new")
    for broken in (page.replace("table.py x: end", "table.py z: end"), page + page,  # no end; two pairs
                   "<!-- table.py x: end -->\n" + page.replace("<!-- table.py x: end -->\n", "")):  # end first
        with pytest.raises(SystemExit, match="no single '<!-- table.py x: begin -->'"):
            table.spliced(broken, "table.py x", "new")


def test_a_runs_own_files_count_before_its_saved_record(tmp_path):
    write_run(tmp_path / "main-seed1", {"sst": 0.40, "para": 0.80, "sts": 0.85}, 0.70, 600.0)
    record = lambda seed, sst: {"row": "main", "seed": seed, "epochs": [],
                                "best": {"dev": {"sst": sst, "para": 0.8, "sts": 0.85}, "overall": 0.7, "seconds": 60.0}}
    saved = {("main", 1): record(1, 0.99), ("main", 2): record(2, 0.50)}
    runs = table.finished_runs("main", table.by_run(table.runs_record(tmp_path, saved)))
    assert sorted(runs) == [1, 2] and runs[1][0]["sst"] == 0.40 and runs[2] == (saved["main", 2]["best"]["dev"]
                                                                                 | {"overall": 0.7}, 1.0)


def test_a_saved_run_is_not_run_again_unless_a_student_needs_its_checkpoint(tmp_path, monkeypatch):
    """In a fresh clone (saved records, no runs folder) the script runs only what has no record;
    a student's teachers run again first, once, because a student learns from their files."""
    ran = []

    def fake_train(argv, **_):  # stands in for train.py: a finished run is a folder with scores.json
        out_dir = Path(argv[argv.index("--out_dir") + 1])
        ran.append(out_dir.name)
        out_dir.mkdir(parents=True)
        (out_dir / "scores.json").write_text("{}")
        return 0

    monkeypatch.setattr(table.subprocess, "call", fake_train)
    monkeypatch.setattr(table, "native_precision", lambda device: "bf16")  # whatever this machine has
    teachers = [(f"{task}-alone", 11711) for task in ("sst", "para", "sts")]
    saved = {run: {} for run in [*teachers, ("student-mix", 11711), ("main", 1)]}
    for name, seed in [("main", 1), ("student-mix", 11711), ("student-mix", 1), ("student-anneal", 1)]:
        table.run_unfinished(name, seed, tmp_path, tmp_path, saved)
    assert ran == ["sst-alone-seed11711", "para-alone-seed11711", "sts-alone-seed11711",
                   "student-mix-seed1", "student-anneal-seed1"]


def test_every_run_is_pinned_to_bf16_and_a_machine_that_would_emulate_it_runs_none(tmp_path, monkeypatch):
    """The study's arithmetic is the same on every machine; where bf16 is not native the script
    stops with one line before it starts a run, rather than take hours over each."""
    monkeypatch.setattr(train, "native_precision", lambda device: "fp32")  # what auto would pick without the pin
    assert all(train.parse_args(shlex.split(table.run_flags(name, 1, tmp_path))).precision == "bf16"
               for name in table.FLAGS)
    monkeypatch.setattr(table.subprocess, "call", lambda *a, **k: pytest.fail("a run was started"))
    monkeypatch.setattr(table, "native_precision", lambda device: "fp32")
    with pytest.raises(SystemExit, match="main-seed1 not run: this machine has no native bf16 matmul"):
        table.run_unfinished("main", 1, tmp_path, tmp_path, {})
    assert not tmp_path.joinpath("main-seed1").exists()
