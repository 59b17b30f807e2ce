"""The README's results table, reproduced by one command.

    python results/table.py --data_dir ../shared/data            # run every unfinished row, print the table
    python results/table.py --data_dir ../shared/data --dry_run  # print the table of the finished rows only

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
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (row name, what the row is, train.py flags); a row whose flags are ("epoch", N, "other row")
# reads epoch N of the other row's run instead of running: without a learning-rate schedule the
# first epoch of a longer run is exactly a one-epoch run with the same flags.
SECTIONS = [
    ("Multi-task at the defaults: SST + PARA + STS, finetune, lr 5e-5, dropout 0.1", [
        ("main", "the main command: GLS + round-robin, 3 epochs", "--option finetune --loss gls --sampler roundrobin"),
        ("main-1", "the main command's epoch 1", ("epoch", 1, "main")),
        ("main-seed1", "the main command with --seed 1, 1 epoch (seed noise)",
         "--option finetune --loss gls --sampler roundrobin --epochs 1 --seed 1"),
        ("fls-roundrobin-dropout0.1", "FLS(para) + round-robin, 3 epochs",
         "--loss fls --focus para --sampler roundrobin --epochs 3"),
    ]),
    ("Single-task, the study's Table 1 (dropout 0.3, the study's)", [
        ("sst-pretrain", "SST, pretrain (encoder frozen)",
         "--option pretrain --tasks sst --epochs 2 --hidden_dropout_prob 0.3"),
        ("para-pretrain", "PARA, pretrain (encoder frozen)",
         "--option pretrain --tasks para --epochs 1 --hidden_dropout_prob 0.3"),
        ("sts-pretrain", "STS, pretrain: the released encoder (the STS head has no weights)",
         "--tasks sts --eval_only"),
        ("sst-finetune", "SST, finetune", "--tasks sst --epochs 1 --hidden_dropout_prob 0.3"),
        ("para-finetune", "PARA, finetune", "--tasks para --epochs 1 --hidden_dropout_prob 0.3"),
        ("sts-finetune", "STS, finetune", "--tasks sts --epochs 1 --hidden_dropout_prob 0.3"),
        ("cfimdb-finetune", "CFIMDB, finetune (reviews cut at 256 tokens)",
         "--tasks cfimdb --epochs 2 --max_length 256 --hidden_dropout_prob 0.3"),
    ]),
    ("Multi-task: SST + PARA + STS, finetune, lr 5e-5, dropout 0.3 (the study's)", [
        ("gls-roundrobin-dropout0.3", "GLS + round-robin, 4 epochs (best: epoch 3)",
         "--loss gls --sampler roundrobin --epochs 4 --hidden_dropout_prob 0.3"),
        ("gls-roundrobin-dropout0.3-2", "GLS + round-robin, 2 epochs", ("epoch", 2, "gls-roundrobin-dropout0.3")),
        ("sum-sequential", "baseline: sum + sequential, AdamW, 1 epoch",
         "--loss sum --sampler sequential --epochs 1 --hidden_dropout_prob 0.3"),
        ("gls-roundrobin-dropout0.3-1", "GLS + round-robin, 1 epoch", ("epoch", 1, "gls-roundrobin-dropout0.3")),
        ("gls-break", "GLS + break, 1 epoch", "--loss gls --sampler break --epochs 1 --hidden_dropout_prob 0.3"),
        ("fls-break", "FLS(para) + break, 1 epoch",
         "--loss fls --focus para --sampler break --epochs 1 --hidden_dropout_prob 0.3"),
        ("adabelief", "sum + sequential, AdaBelief, 1 epoch",
         "--loss sum --sampler sequential --optimizer adabelief --epochs 1 --hidden_dropout_prob 0.3"),
        ("adabelief-clip", "sum + sequential, AdaBelief + clip 1.0, 1 epoch",
         "--loss sum --sampler sequential --optimizer adabelief --clip_grad 1.0 --epochs 1 --hidden_dropout_prob 0.3"),
        ("proportional", "proportional sampling (alpha 1), 1 epoch",
         "--sampler proportional --epochs 1 --hidden_dropout_prob 0.3"),
        ("fls-roundrobin", "FLS(para) + round-robin, 3 epochs",
         "--loss fls --focus para --sampler roundrobin --epochs 3 --hidden_dropout_prob 0.3"),
        ("fls-roundrobin-1", "FLS(para) + round-robin, 1 epoch", ("epoch", 1, "fls-roundrobin")),
        ("main-linear", "GLS + round-robin, learning rate falling linearly to 0, 3 epochs",
         "--loss gls --sampler roundrobin --epochs 3 --lr_schedule linear --hidden_dropout_prob 0.3"),
    ]),
    ("Single-task sweeps, finetune, 1 epoch (against the dropout 0.3, lr 5e-5 finetune rows)", [
        ("sst-lr1e-5", "SST, lr 1e-5 (the study's)", "--tasks sst --lr 1e-5 --epochs 1 --hidden_dropout_prob 0.3"),
        ("sst-lr2e-5", "SST, lr 2e-5", "--tasks sst --lr 2e-5 --epochs 1 --hidden_dropout_prob 0.3"),
        ("sst-lr1e-4", "SST, lr 1e-4", "--tasks sst --lr 1e-4 --epochs 1 --hidden_dropout_prob 0.3"),
        ("sst-dropout0.1", "SST, dropout 0.1", "--tasks sst --epochs 1"),
        ("sst-dropout0.5", "SST, dropout 0.5", "--tasks sst --epochs 1 --hidden_dropout_prob 0.5"),
        ("sst-dropout0", "SST, dropout 0", "--tasks sst --epochs 1 --hidden_dropout_prob 0"),
        ("para-dropout0.1", "PARA, dropout 0.1", "--tasks para --epochs 1"),
        ("sts-dropout0.1", "STS, dropout 0.1", "--tasks sts --epochs 1"),
        ("sts-dropout0", "STS, dropout 0", "--tasks sts --epochs 1 --hidden_dropout_prob 0"),
        ("sst-smart", "SST, SMART (paper defaults)", "--tasks sst --epochs 1 --smart --hidden_dropout_prob 0.3"),
    ]),
]
TASKS = ("sst", "para", "sts")


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


def epoch_records(out_dir):
    """The run's metrics.jsonl, one record per finished epoch ([] before the first)."""
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def row_result(name, flags, runs_dir):
    """(dev scores, overall, epochs, minutes) of a finished row, or None."""
    if isinstance(flags, tuple):
        _, epoch, other = flags
        records = epoch_records(runs_dir / other)
        if len(records) < epoch:
            return None
        record = records[epoch - 1]
        return record["dev"], record["overall"], epoch, sum(r["seconds"] for r in records[:epoch]) / 60
    out_dir = runs_dir / name
    if not (out_dir / "scores.json").is_file():
        return None
    summary = json.loads((out_dir / "scores.json").read_text())
    records = epoch_records(out_dir)
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
                       else f"`python train.py {flags} --data_dir ../shared/data`")
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder with the CS224N task files")
    p.add_argument("--runs_dir", default="runs/table", help="where the rows' runs go")
    p.add_argument("--only", default=None, help="comma list of row names to run, in this order (default: every row)")
    p.add_argument("--dry_run", action="store_true", help="run nothing, print the table of finished rows")
    args = p.parse_args()
    runs_dir, data_dir = (ROOT / args.runs_dir).resolve(), Path(args.data_dir).resolve()
    flags_of = {name: flags for _, rows in SECTIONS for name, _, flags in rows}
    names = list(flags_of)
    only = names if args.only is None else args.only.split(",")
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {', '.join(names)}")
    if not args.dry_run:
        for name in only:  # in the order given
            if isinstance(flags_of[name], str):
                run_row(name, flags_of[name], runs_dir, data_dir)
    print(markdown_table(runs_dir))


if __name__ == "__main__":
    main()
