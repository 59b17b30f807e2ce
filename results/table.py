"""The results table (results/README.md), reproduced by one command.

    python results/table.py --data_dir ../shared/data            # run every unfinished row, print the table
    python results/table.py --data_dir ../shared/data --dry_run  # print the table of the finished rows only
    python results/table.py --dry_run --write_runs               # and save their flags and metrics (below)

Every row is one train.py run with the flags below, in runs/table/<row name>; its log goes to
runs/table/<row name>.log. A row whose run has written scores.json (train.py's last act) is
finished and is not run again; a run that was stopped part-way is continued with --resume, so the
script can be stopped and started again at any time, and the table can be filled over several
sessions. Rows run one after another, on purpose: on a 2-core CPU two runs at once only slow
each other down. The script adds `--save_every 500` to every run (it changes no result, only how
much a stopped run loses).

Each table cell is the dev score of the run's best epoch (the checkpoint train.py keeps, by the
overall score; the overall column is left empty for single-task rows); wall time is train.py's
own count of training plus the dev pass of every epoch.

results/table-runs.jsonl keeps, per finished row, what its run's own files say: the flags it ran
with (args.json), its best dev scores and every epoch's record. The tests hold each row's command
to those flags, so a changed default cannot silently change what an old row's command runs.
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the flags that do not change what a run learns (paths, devices, speed)
from train import FREE_ON_RESUME, read_metrics  # noqa: E402

# (row name, what the row is, train.py flags); a row whose flags are ("epoch", N, "other row")
# reads epoch N of the other row's run instead of running: at a constant learning rate the first
# epoch of a longer run is exactly a one-epoch run with the same flags (tests check the other row's
# schedule). Rows run before a default changed pin the value they ran with, so that every printed
# command still reproduces its row under today's defaults.
B8, CONSTANT, LR5E5 = "--batch_size 8", "--lr_schedule constant", "--lr 5e-5"
MAIN = "--option finetune --loss gls --sampler roundrobin"
SECTIONS = [
    ("Multi-task at the defaults: SST + PARA + STS, finetune, batch 32, lr 1e-4 falling linearly to 0, "
     "dropout 0.1", [
        ("main", "the main command: GLS + round-robin, 3 epochs", MAIN),
        ("main-5ep", "GLS + round-robin, 5 epochs", f"{MAIN} --epochs 5"),
        ("main-seed1", "the main command with --seed 1 (seed noise)", f"{MAIN} --seed 1"),
        ("fls", "FLS(para) + round-robin, 3 epochs",
         "--option finetune --loss fls --focus para --sampler roundrobin"),
        ("main-1ep", "GLS + round-robin, 1 epoch (SST seen about twice)", f"{MAIN} --epochs 1"),
        ("main-2ep", "GLS + round-robin, 2 epochs", f"{MAIN} --epochs 2"),
    ]),
    ("Single-task at the defaults: each task without the other two", [
        ("sst-alone", "SST alone, 3 epochs (best: epoch 2)", "--tasks sst"),
        ("para-alone", "PARA alone, 3 epochs", "--tasks para"),
        ("sts-alone", "STS alone, 3 epochs", "--tasks sts"),
        ("sst-alone-5ep", "SST alone, 5 epochs (best: epoch 2)", "--tasks sst --epochs 5"),
        ("sst-alone-lr5e-5", "SST alone, lr 5e-5 (best: epoch 2)", "--tasks sst --lr 5e-5"),
        ("sst-alone-dropout0", "SST alone, dropout 0 (best: epoch 2)", "--tasks sst --hidden_dropout_prob 0"),
    ]),
    ("Multi-task, batch 8, constant lr 5e-5, dropout 0.1 (the defaults before batch 32)", [
        ("main-b8", "GLS + round-robin, 3 epochs", f"{MAIN} --epochs 3 {B8} {CONSTANT} {LR5E5}"),
        ("main-b8-1", "GLS + round-robin, 3 epochs: its epoch 1", ("epoch", 1, "main-b8")),
        ("main-b8-seed1", "GLS + round-robin with --seed 1, 1 epoch (seed noise)",
         f"{MAIN} --epochs 1 --seed 1 {B8} {CONSTANT} {LR5E5}"),
        ("fls-roundrobin-dropout0.1", "FLS(para) + round-robin, 3 epochs",
         f"--loss fls --focus para --sampler roundrobin --epochs 3 {B8} {CONSTANT} {LR5E5}"),
    ]),
    ("Single-task, the study's Table 1 (batch 8, a constant rate and dropout 0.3, the study's; finetune lr 5e-5)", [
        ("sst-pretrain", "SST, pretrain (encoder frozen)",
         f"--option pretrain --tasks sst --epochs 2 --hidden_dropout_prob 0.3 {B8} {CONSTANT}"),
        ("para-pretrain", "PARA, pretrain (encoder frozen)",
         f"--option pretrain --tasks para --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT}"),
        ("sts-pretrain", "STS, pretrain: the released encoder (the STS head has no weights)",
         "--tasks sts --eval_only"),
        ("sst-finetune", "SST, finetune",
         f"--tasks sst --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("para-finetune", "PARA, finetune",
         f"--tasks para --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("sts-finetune", "STS, finetune",
         f"--tasks sts --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("cfimdb-finetune", "CFIMDB, finetune (reviews cut at 256 tokens)",
         f"--tasks cfimdb --epochs 2 --max_length 256 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
    ]),
    ("Multi-task: SST + PARA + STS, finetune, batch 8, constant lr 5e-5, the study's dropout 0.3", [
        ("gls-roundrobin-dropout0.3", "GLS + round-robin, 4 epochs (best: epoch 3)",
         f"--loss gls --sampler roundrobin --epochs 4 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("gls-roundrobin-dropout0.3-2", "GLS + round-robin, 2 epochs", ("epoch", 2, "gls-roundrobin-dropout0.3")),
        ("sum-sequential", "baseline: sum + sequential, AdamW, 1 epoch",
         f"--loss sum --sampler sequential --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("gls-roundrobin-dropout0.3-1", "GLS + round-robin, 1 epoch", ("epoch", 1, "gls-roundrobin-dropout0.3")),
        ("gls-break", "GLS + break, 1 epoch",
         f"--loss gls --sampler break --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("fls-break", "FLS(para) + break, 1 epoch",
         f"--loss fls --focus para --sampler break --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("adabelief", "sum + sequential, AdaBelief, 1 epoch",
         "--loss sum --sampler sequential --optimizer adabelief --epochs 1"
         f" --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("adabelief-clip", "sum + sequential, AdaBelief + clip 1.0, 1 epoch",
         "--loss sum --sampler sequential --optimizer adabelief --clip_grad 1.0 --epochs 1"
         f" --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("proportional", "proportional sampling (alpha 1), 1 epoch",
         f"--sampler proportional --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("fls-roundrobin", "FLS(para) + round-robin, 3 epochs",
         "--loss fls --focus para --sampler roundrobin --epochs 3"
         f" --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
        ("fls-roundrobin-1", "FLS(para) + round-robin, 1 epoch", ("epoch", 1, "fls-roundrobin")),
        ("main-linear", "GLS + round-robin, learning rate falling linearly to 0, 3 epochs",
         f"--loss gls --sampler roundrobin --epochs 3 --lr_schedule linear --hidden_dropout_prob 0.3 {B8} {LR5E5}"),
    ]),
    ("Single-task sweeps, finetune, batch 8, constant lr, 1 epoch (against the dropout 0.3, lr 5e-5 rows)", [
        ("sst-lr1e-5", "SST, lr 1e-5 (the study's)",
         f"--tasks sst --lr 1e-5 --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT}"),
        ("sst-lr2e-5", "SST, lr 2e-5",
         f"--tasks sst --lr 2e-5 --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT}"),
        ("sst-lr1e-4", "SST, lr 1e-4",
         f"--tasks sst --lr 1e-4 --epochs 1 --hidden_dropout_prob 0.3 {B8} {CONSTANT}"),
        ("sst-dropout0.1", "SST, dropout 0.1",
         f"--tasks sst --epochs 1 {B8} {CONSTANT} {LR5E5}"),
        ("sst-dropout0.5", "SST, dropout 0.5",
         f"--tasks sst --epochs 1 --hidden_dropout_prob 0.5 {B8} {CONSTANT} {LR5E5}"),
        ("sst-dropout0", "SST, dropout 0",
         f"--tasks sst --epochs 1 --hidden_dropout_prob 0 {B8} {CONSTANT} {LR5E5}"),
        ("para-dropout0.1", "PARA, dropout 0.1",
         f"--tasks para --epochs 1 {B8} {CONSTANT} {LR5E5}"),
        ("sts-dropout0.1", "STS, dropout 0.1",
         f"--tasks sts --epochs 1 {B8} {CONSTANT} {LR5E5}"),
        ("sts-dropout0", "STS, dropout 0",
         f"--tasks sts --epochs 1 --hidden_dropout_prob 0 {B8} {CONSTANT} {LR5E5}"),
        ("sst-smart", "SST, SMART (paper defaults)",
         f"--tasks sst --epochs 1 --smart --hidden_dropout_prob 0.3 {B8} {CONSTANT} {LR5E5}"),
    ]),
]
# Every row above ran in float32, before bf16 became the default on hardware that has it: each
# row pins --precision fp32, so that its command still runs what it ran.
SECTIONS = [(title, [(name, label, flags if isinstance(flags, tuple) else f"{flags} --precision fp32")
                     for name, label, flags in rows]) for title, rows in SECTIONS]
FLAGS = {name: flags for _, rows in SECTIONS for name, _, flags in rows}  # row name -> its flags
TASKS = ("sst", "para", "sts")
RUNS_FILE = ROOT / "results" / "table-runs.jsonl"


def row_command(flags):
    """The command a row prints (and its saved run record names)."""
    return f"python train.py {flags} --data_dir ../shared/data"


def run_row(name, flags, runs_dir, data_dir):
    """Run (or continue) one row's train.py; a failed run stops the script with train.py's error."""
    out_dir = runs_dir / name
    if (out_dir / "scores.json").is_file():
        return
    argv = [sys.executable, "train.py", *shlex.split(flags), "--data_dir", str(data_dir), "--out_dir", str(out_dir)]
    if "--eval_only" not in flags:
        argv += ["--save_every", "500"]
    if (out_dir / "last.pt").is_file():
        argv.append("--resume")
    elif out_dir.exists():  # stopped before its first checkpoint: nothing worth keeping
        shutil.rmtree(out_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"running {name}: {shlex.join(argv[1:])}", file=sys.stderr, flush=True)
    with open(runs_dir / f"{name}.log", "a") as log:
        code = subprocess.call(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"error: {name} failed (exit {code}); see {runs_dir / name}.log")


def row_result(name, flags, runs_dir):
    """(dev scores, overall, epochs, minutes) of a finished row, or None."""
    if isinstance(flags, tuple):
        _, epoch, other = flags
        records = read_metrics(runs_dir / other)
        if len(records) < epoch:
            return None
        record = records[epoch - 1]
        return record["dev"], record["overall"], epoch, sum(r["seconds"] for r in records[:epoch]) / 60
    out_dir = runs_dir / name
    if not (out_dir / "scores.json").is_file():
        return None
    summary = json.loads((out_dir / "scores.json").read_text())
    records = read_metrics(out_dir)
    seconds = sum(r["seconds"] for r in records) if records else summary["seconds"]
    return summary["dev"], summary["overall"], len(records), seconds / 60


def markdown_table(runs_dir):
    lines = []
    for title, rows in SECTIONS:
        lines += ["", f"**{title}**", "",
                  "| run | epochs | SST acc | PARA acc | STS r | overall | wall (min) | command |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, label, flags in rows:
            result = row_result(name, flags, runs_dir)
            command = (f"epoch {flags[1]} of the `{flags[2]}` row" if isinstance(flags, tuple)
                       else f"`{row_command(flags)}`")
            if result is None:
                lines.append(f"| {label} | | not run yet | | | | | {command} |")
                continue
            dev, overall, epochs, minutes = result
            cells = [f"{dev[t]:.3f}" if t in dev else "–" for t in TASKS]
            if "cfimdb" in dev:
                cells[0] = f"CFIMDB {dev['cfimdb']:.3f}"
            overall = f"{overall:.3f}" if len(dev) > 1 else "–"  # one task: its own score is the row
            lines.append(f"| {label} | {epochs or '–'} | {' | '.join(cells)} | {overall} | {minutes:.1f} "
                         f"| {command} |")
    return "\n".join(lines[1:])


def read_saved_runs():
    """The records of results/table-runs.jsonl ([] before it exists)."""
    return [json.loads(line) for line in RUNS_FILE.read_text().splitlines()] if RUNS_FILE.is_file() else []


def runs_record(runs_dir, saved_before):
    """One record per finished row with a run of its own: its command, the flags it ran with
    (args.json, less train.FREE_ON_RESUME's paths and speed flags), the best model's dev scores and
    every epoch's record.
    A row whose run is not in runs_dir keeps its record from `saved_before` (row name -> record):
    runs/ is not part of the repository, and a fresh clone must not wipe the saved results."""
    records = []
    for _, rows in SECTIONS:
        for name, label, flags in rows:
            if isinstance(flags, tuple):
                continue
            out_dir = runs_dir / name
            if not (out_dir / "scores.json").is_file():
                if name in saved_before:
                    records.append(saved_before[name])
                continue
            saved = {}  # an --eval_only row trains nothing and saves no args.json
            if (out_dir / "args.json").is_file():
                saved = json.loads((out_dir / "args.json").read_text())
            records.append({"row": name, "run": label, "command": row_command(flags),
                            "args": {k: v for k, v in saved.items() if k not in FREE_ON_RESUME},
                            "best": json.loads((out_dir / "scores.json").read_text()),
                            "epochs": read_metrics(out_dir)})
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder with the CS224N task files")
    p.add_argument("--runs_dir", default="runs/table", help="where the rows' runs go")
    p.add_argument("--only", default=None, help="comma list of row names to run, in this order (default: every row)")
    p.add_argument("--dry_run", action="store_true", help="run nothing, print the table of finished rows")
    p.add_argument("--write_runs", action="store_true",
                   help="also write results/table-runs.jsonl: every finished row's flags and metrics")
    args = p.parse_args()
    runs_dir, data_dir = (ROOT / args.runs_dir).resolve(), Path(args.data_dir).resolve()
    names = list(FLAGS)
    only = names if args.only is None else args.only.split(",")
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {', '.join(names)}")
    if not args.dry_run:
        for name in only:  # in the order given
            if isinstance(FLAGS[name], str):
                run_row(name, FLAGS[name], runs_dir, data_dir)
    print(markdown_table(runs_dir))
    if args.write_runs:
        records = runs_record(runs_dir, {r["row"]: r for r in read_saved_runs()})
        RUNS_FILE.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {RUNS_FILE.relative_to(ROOT)} ({len(records)} rows)", file=sys.stderr)


if __name__ == "__main__":
    main()
