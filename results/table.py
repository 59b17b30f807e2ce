"""The study's comparisons at today's defaults, three seeds a row (results/README.md), in one command.

    python results/table.py --data_dir ../shared/data                # run every unfinished run, print the page's tables
    python results/table.py --data_dir ../shared/data --seeds 11711  # only the default seed's runs
    python results/table.py --dry_run                                # print the tables from the finished runs only
    python results/table.py --dry_run --write_runs --write_pages     # and save every run's record (below), and
                                                                     # write the tables into the results page

Every row is one train.py command, run once for each seed in SEEDS (`--seed` added), in
runs/study/<row>-seed<seed>, its log beside it as <row>-seed<seed>.log. A run that has written
scores.json (train.py's last act), or whose record is saved (below), is finished and is not run
again; a run stopped part-way is continued with --resume, so the script can be stopped and
started again at any time, over several sessions. A student needs its teachers' checkpoints, not
their records: a teacher whose folder is gone (a fresh clone has none) runs again first, and its
new files then replace its saved record. Runs go one after another, on purpose: on a 2-core CPU
two at once only slow each other down. `--save_every 200` is added to every run (it changes no
result, only how much a stopped run loses), and `--precision bf16`: auto's choice on the CPUs
the study ran on (AVX512-BF16), pinned so that every run does the same arithmetic. A machine
without a native bf16 matmul would emulate it about 150 times slower than float32 (measured on
an AVX2-only CPU), so there the script runs nothing and says so. A row can stand in several
sections (the main command is the reference of most); it runs once.

Each cell is the mean, over the row's finished seeds, of the dev score of each run's best epoch
(the checkpoint train.py keeps, by the overall score), ± half the spread (max - min) of those
scores; wall time is the median over the seeds of train.py's own count of training plus each
epoch's dev pass (the median: a run paused or resumed part-way miscounts its own time).

Under the tables, one line per claim (CLAIMS): "holds" where row A's mean beats row B's by more
than twice the standard error of the difference (Welch's, from the seeds' sample variances),
"the other way" where B's beats A's by as much, else "within seed noise". With three seeds a
side that is a rough test (about 90% two-sided, by Student's t at 4 degrees of freedom): enough
to tell a seed's wobble from an effect, not to settle a small one.

results/study-runs.jsonl keeps, per finished run, what its files say: its row and seed, the
flags it ran with (args.json), its best dev scores and every epoch's record; the tests hold every
row's command to those flags. A run not finished in --runs_dir counts by its record there, so a
fresh clone prints the same tables, and `--write_pages` writes them into the pages that show them
(saving the records first). results/history.jsonl keeps the rows of the table before this one
(run at earlier defaults, mostly one seed each, with the commit they were recorded at);
`--history` prints them. Today's code does not run them: their commands are in their records.
"""
import argparse
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from checkpoints import read_metrics  # noqa: E402
# FREE_ON_RESUME: the flags that do not change what a run learns (paths, devices, speed)
from train import FREE_ON_RESUME, native_precision, pick_device  # noqa: E402

SEEDS = (11711, 1, 2)  # 11711 is train.py's default
PRECISION = "bf16"  # what --precision auto chose on the CPUs the study ran on, pinned: another machine runs the same sums
RUNS = "{runs}"  # stands for the runs folder in a row's flags: a student's teachers are other rows' runs
MAIN = "--option finetune --loss gls --sampler roundrobin"
TEACHERS = ",".join(f"{RUNS}/{task}-alone-seed{SEEDS[0]}" for task in ("sst", "para", "sts"))
ENSEMBLE = ",".join(f"{RUNS}/{task}-alone-seed{seed}" for task in ("sst", "para", "sts") for seed in SEEDS)
FOLDS = 5  # out-of-fold teachers: each task alone, once without each fold (distill.py)
FOLD_ROWS = [(f"{task}-fold{k}of{FOLDS}", f"{task.upper()} alone, without fold {k} of {FOLDS}",
              f"--tasks {task} --fold {k}/{FOLDS}") for task in ("sst", "para", "sts") for k in range(FOLDS)]
OUT_OF_FOLD = ",".join(f"{RUNS}/{name}-seed{SEEDS[0]}" for name, _, _ in FOLD_ROWS)

# (section title, [(row name, what the row is, train.py flags)])
SECTIONS = [
    ("The study's Table 1: each task alone, frozen (pretrain) or fine-tuned, and the multi-task baseline", [
        ("sst-pretrain", "SST, pretrain (encoder frozen, lr 1e-3)", "--option pretrain --tasks sst"),
        ("sst-alone", "SST, finetune", "--tasks sst"),
        ("para-pretrain", "PARA, pretrain", "--option pretrain --tasks para"),
        ("para-alone", "PARA, finetune", "--tasks para"),
        ("sts-pretrain", "STS, the released encoder (its head has no weights: nothing to train, one run)",
         "--tasks sts --eval_only"),
        ("sts-alone", "STS, finetune", "--tasks sts"),
        ("cfimdb-alone", "CFIMDB, finetune (reviews cut at 128 tokens)", "--tasks cfimdb"),
        ("baseline", "multi-task baseline: sum + sequential, AdamW", "--loss sum --sampler sequential"),
    ]),
    ("Optimizer, on the main command (GLS + round-robin)", [
        ("main", "AdamW (the main command)", MAIN),
        ("adabelief", "AdaBelief", f"{MAIN} --optimizer adabelief"),
        ("adabelief-clip", "AdaBelief + global-norm clipping at 1.0", f"{MAIN} --optimizer adabelief --clip_grad 1.0"),
    ]),
    ("Loss strategy, round-robin", [
        ("sum-roundrobin", "sum", "--loss sum --sampler roundrobin"),
        ("main", "GLS (the main command)", MAIN),
        ("fls-roundrobin", "FLS(para)", "--loss fls --focus para --sampler roundrobin"),
    ]),
    ("Sampler, GLS", [
        ("gls-sequential", "sequential", "--loss gls --sampler sequential"),
        ("gls-break", "break", "--loss gls --sampler break"),
        ("main", "round-robin (the main command)", MAIN),
        ("gls-proportional", "proportional (alpha 1)", "--loss gls --sampler proportional"),
    ]),
    ("SMART with its Bregman proximal update, SST alone", [
        ("sst-alone", "without SMART", "--tasks sst"),
        ("sst-smart", "epsilon 1e-5 (the paper's)", "--tasks sst --smart"),
        ("sst-smart-eps1e-3", "epsilon 1e-3 (R_s about 100 times that at 1e-5, smart.py)",
         "--tasks sst --smart --smart_eps 1e-3"),
        ("sst-smart-mu0", "epsilon 1e-5 without the Bregman term (mu 0): the adversarial term alone",
         "--tasks sst --smart --bregman_mu 0"),
    ]),
    (f"Out-of-fold teachers: each task alone without one fold of {FOLDS} (seed 11711 only, as every teacher here)",
     FOLD_ROWS),
    ("Distillation: the main command as the student of the single-task rows (their seed 11711)", [
        ("main", "no teachers (the main command)", MAIN),
        ("student-anneal", "teacher annealing (Clark et al., 2019)", f"{MAIN} --teachers {TEACHERS}"),
        ("student-mix", "a fixed mix, half gold, half teacher", f"{MAIN} --teachers {TEACHERS} --distill_anneal none"),
        ("student-ensemble-mix", "three teachers a task (the alone rows' three seeds), a fixed half mix "
         "(Liu et al., 2019)", f"{MAIN} --teachers {ENSEMBLE} --distill_anneal none"),
        ("student-anneal-ce", "teacher annealing, cross-entropy in place of KL",
         f"{MAIN} --teachers {TEACHERS} --distill_loss ce"),
        ("student-anneal-oof", "teacher annealing, each example taught by the fold teacher that never saw it",
         f"{MAIN} --teachers {OUT_OF_FOLD}"),
    ]),
]
FLAGS = {name: flags for _, rows in SECTIONS for name, _, flags in rows}  # row name -> its flags
LABELS = {name: label for _, rows in SECTIONS for name, label, _ in rows}

# (the claim, (row A, score), (row B, score)): the claim holds when A's score beats B's
CLAIMS = [
    ("Fine-tuning beats a frozen encoder: SST", ("sst-alone", "sst"), ("sst-pretrain", "sst")),
    ("Fine-tuning beats a frozen encoder: PARA", ("para-alone", "para"), ("para-pretrain", "para")),
    ("Fine-tuning beats the released encoder: STS", ("sts-alone", "sts"), ("sts-pretrain", "sts")),
    ("The multi-task model trails the single-task one: SST", ("sst-alone", "sst"), ("main", "sst")),
    ("The multi-task model trails the single-task one: PARA", ("para-alone", "para"), ("main", "para")),
    ("The multi-task model trails the single-task one: STS", ("sts-alone", "sts"), ("main", "sts")),
    ("GLS + round-robin beats the baseline (sum + sequential)", ("main", "overall"), ("baseline", "overall")),
    ("AdaBelief beats AdamW", ("adabelief", "overall"), ("main", "overall")),
    ("Clipping at 1.0 helps AdaBelief", ("adabelief-clip", "overall"), ("adabelief", "overall")),
    ("GLS beats the sum", ("main", "overall"), ("sum-roundrobin", "overall")),
    ("FLS(para) raises PARA over GLS", ("fls-roundrobin", "para"), ("main", "para")),
    ("FLS(para) beats GLS overall", ("fls-roundrobin", "overall"), ("main", "overall")),
    ("Round-robin beats sequential", ("main", "overall"), ("gls-sequential", "overall")),
    ("Round-robin beats break", ("main", "overall"), ("gls-break", "overall")),
    ("Round-robin beats proportional", ("main", "overall"), ("gls-proportional", "overall")),
    ("SMART raises SST, epsilon 1e-5", ("sst-smart", "sst"), ("sst-alone", "sst")),
    ("SMART raises SST, epsilon 1e-3", ("sst-smart-eps1e-3", "sst"), ("sst-alone", "sst")),
    ("Without its Bregman term SMART does better on SST (epsilon 1e-5)", ("sst-smart-mu0", "sst"), ("sst-smart", "sst")),
    ("SMART's adversarial term alone (mu 0) raises SST", ("sst-smart-mu0", "sst"), ("sst-alone", "sst")),
    ("Distillation (annealed) beats the plain multi-task model", ("student-anneal", "overall"), ("main", "overall")),
    ("The annealed student reaches its SST teacher", ("student-anneal", "sst"), ("sst-alone", "sst")),
    ("The annealed student reaches its PARA teacher", ("student-anneal", "para"), ("para-alone", "para")),
    ("The annealed student reaches its STS teacher", ("student-anneal", "sts"), ("sts-alone", "sts")),
    ("Annealing beats a fixed half mix", ("student-anneal", "overall"), ("student-mix", "overall")),
    ("An ensemble of teachers beats one (fixed mix)", ("student-ensemble-mix", "overall"), ("student-mix", "overall")),
    ("KL beats cross-entropy under GLS (annealed)", ("student-anneal", "overall"), ("student-anneal-ce", "overall")),
    ("Out-of-fold teachers beat in-sample ones (annealed)", ("student-anneal-oof", "overall"),
     ("student-anneal", "overall")),
]
TASKS = ("sst", "para", "sts")
STUDY_RUNS = ROOT / "results" / "study-runs.jsonl"
HISTORY = ROOT / "results" / "history.jsonl"


# ----------------------------------------------------------------------------- the runs

def seeds_of(name):
    """An --eval_only row trains nothing, so its seeds would all give the same run; a fold
    teacher runs once, with the seed of the other teachers."""
    return SEEDS[:1] if "--eval_only" in FLAGS[name] or "--fold" in FLAGS[name] else SEEDS


def run_name(name, seed):
    return f"{name}-seed{seed}"


def run_flags(name, seed, runs_dir):
    """The row's train.py flags for one seed, with the runs folder put in and the precision pinned."""
    return f"{FLAGS[name].replace(RUNS, str(runs_dir))} --precision {PRECISION} --seed {seed}"


def row_command(name):
    """The command a row prints (its runs add --seed)."""
    return f"python train.py {FLAGS[name].replace(RUNS, 'runs/study')} --data_dir ../shared/data"


def teacher_runs(name):
    """(row, seed) of each run the row's flags name as a teacher."""
    return [(row, int(seed)) for row, seed in re.findall(r"\{runs\}/([\w-]+?)-seed(\d+)", FLAGS[name])]


def run_unfinished(name, seed, runs_dir, data_dir, saved):
    """Run one seed of a row unless it is finished (its scores.json, or its record in `saved`),
    after running again any teacher of it whose folder is gone."""
    if (runs_dir / run_name(name, seed) / "scores.json").is_file() or (name, seed) in saved:
        return
    for teacher in teacher_runs(name):
        run_one(*teacher, runs_dir, data_dir)
    run_one(name, seed, runs_dir, data_dir)


def run_one(name, seed, runs_dir, data_dir):
    """Run (or continue) one seed of a row, unless its folder holds a finished run; a failed run
    stops the script with train.py's error."""
    out_dir = runs_dir / run_name(name, seed)
    if (out_dir / "scores.json").is_file():
        return
    if native_precision(pick_device("auto")) != PRECISION:  # emulated: hours a row, not minutes
        sys.exit(f"error: {out_dir.name} not run: this machine has no native {PRECISION} matmul, the study's "
                 "precision (CPUs with AVX512-BF16 or AMX and CUDA cards with bf16 have one)")
    argv = [sys.executable, "train.py", *shlex.split(run_flags(name, seed, runs_dir)),
            "--data_dir", str(data_dir), "--out_dir", str(out_dir)]
    if "--eval_only" not in FLAGS[name]:
        argv += ["--save_every", "200"]
    if (out_dir / "last.pt").is_file():
        argv.append("--resume")
    elif out_dir.exists():  # stopped before its first checkpoint: nothing worth keeping
        shutil.rmtree(out_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"running {out_dir.name}: {shlex.join(argv[1:])}", file=sys.stderr, flush=True)
    with open(runs_dir / f"{out_dir.name}.log", "a") as log:
        code = subprocess.call(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"error: {out_dir.name} failed (exit {code}); see {runs_dir / out_dir.name}.log")


def finished_runs(name, records):
    """{seed: (dev scores with "overall", minutes)} of the row's finished runs, from their records
    ((row, seed) -> record: by_run(runs_record(...)))."""
    results = {}
    for seed in seeds_of(name):
        if (name, seed) in records:
            best, epochs = records[name, seed]["best"], records[name, seed]["epochs"]
            seconds = sum(r["seconds"] for r in epochs) if epochs else best["seconds"]
            results[seed] = ({**best["dev"], "overall": best["overall"]}, seconds / 60)
    return results


# ----------------------------------------------------------------------------- the page's tables

def cell(values):
    """The seeds' mean ± half their spread (a lone run: its score)."""
    if not values:
        return ""
    mean, half_spread = statistics.mean(values), (max(values) - min(values)) / 2
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {half_spread:.3f}"


def score_cells(scores):
    """The SST, PARA, STS and overall cells of a row from its runs' scores (dicts of each task's
    score and "overall"); a single-task row leaves overall empty, its task's cell being the row."""
    cells = [cell([dev[t] for dev in scores if t in dev]) or "–" for t in TASKS]
    if "cfimdb" in scores[0]:
        cells[0] = "CFIMDB " + cell([dev["cfimdb"] for dev in scores])
    return cells + [cell([dev["overall"] for dev in scores]) if len(scores[0]) > 2 else "–"]


TABLE_HEADER = ["| run | seeds | SST acc | PARA acc | STS r | overall | wall (min) | command |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]


def row_line(name, label, records):
    """A row of the tables: its finished seeds' cells, median wall time and command."""
    runs = finished_runs(name, records)
    command = f"`{row_command(name)}`"
    if not runs:
        return f"| {label} | 0 of {len(seeds_of(name))} | not run yet | | | | | {command} |"
    cells = score_cells([dev for dev, _ in runs.values()])
    minutes = statistics.median(m for _, m in runs.values())
    return f"| {label} | {len(runs)} of {len(seeds_of(name))} | {' | '.join(cells)} | {minutes:.1f} | {command} |"


def markdown_table(records):
    lines = []
    for title, rows in SECTIONS:
        lines += ["", f"**{title}**", "", *TABLE_HEADER]
        lines += [row_line(name, label, records) for name, label, _ in rows]
    return "\n".join(lines[1:])


def verdict(a, b, exact=()):
    """'holds', 'the other way' or 'within seed noise' for scores a against b (see the docstring);
    None with fewer than two seeds a side, where there is no variance to judge by. A side named in
    `exact` ("a", "b") is one run that no seed changes (an --eval_only row): no variance."""
    def error_part(values, side):
        return 0.0 if side in exact else statistics.variance(values) / len(values)
    if any(len(values) < (1 if side in exact else 2) for values, side in ((a, "a"), (b, "b"))):
        return None
    difference = statistics.mean(a) - statistics.mean(b)
    error = math.sqrt(error_part(a, "a") + error_part(b, "b"))
    if difference > 2 * error:
        return "holds"
    if difference < -2 * error:
        return "the other way"
    return "within seed noise"


def claim_lines(records):
    lines = ["| claim | A | B | A − B | verdict |", "| --- | --- | --- | --- | --- |"]
    for claim, (row_a, score_a), (row_b, score_b) in CLAIMS:
        a = [dev[score_a] for dev, _ in finished_runs(row_a, records).values()]
        b = [dev[score_b] for dev, _ in finished_runs(row_b, records).values()]
        said = verdict(a, b, exact=[side for side, row in (("a", row_a), ("b", row_b)) if len(seeds_of(row)) == 1])
        difference = f"{statistics.mean(a) - statistics.mean(b):+.3f}" if a and b else ""
        lines.append(f"| {claim} | {row_a} {score_a}: {cell(a) or '–'} ({len(a)}) | {row_b} {score_b}: "
                     f"{cell(b) or '–'} ({len(b)}) | {difference} | {said or 'not enough seeds yet'} |")
    return "\n".join(lines)


def history_table():
    """The rows of the table before this one, from their records (results/history.jsonl)."""
    lines, section = [], None
    for record in read_records(HISTORY):
        if record["section"] != section:
            section = record["section"]
            lines += ["", f"**{section}**", "",
                      "| run | epochs | SST acc | PARA acc | STS r | overall | wall (min) | recorded at | command |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        epochs = record["epochs"]
        cells = score_cells([{**record["best"]["dev"], "overall": record["best"]["overall"]}])
        minutes = (sum(r["seconds"] for r in epochs) if epochs else record["best"]["seconds"]) / 60
        lines.append(f"| {record['run']} | {len(epochs) or '–'} | {' | '.join(cells)} | {minutes:.1f} "
                     f"| {record['commit']} | `{record['command']}` |")
    return "\n".join(lines[1:])


# ----------------------------------------------------------------------------- the pages

PAGE, FRONT_DOOR = ROOT / "results" / "README.md", ROOT / "README.md"


def spliced(text, marker, body):
    """`text` with what stands between the lines `<!-- {marker}: begin ... -->` and
    `<!-- {marker}: end -->` replaced by `body`; the prose around them is the page's own."""
    begins = list(re.finditer(rf"<!-- {re.escape(marker)}: begin[^\n]*-->\n", text))
    end = text.find(f"<!-- {marker}: end -->", begins[0].end()) if len(begins) == 1 else -1
    if end < 0:
        sys.exit(f"error: no single '<!-- {marker}: begin -->' ... '<!-- {marker}: end -->' pair to write between")
    return text[:begins[0].end()] + body + "\n" + text[end:]


def pages(records):
    """{path: new text}: the tables, verdicts and history in results/README.md, the main command's
    row in the README's front door."""
    page = PAGE.read_text()
    for marker, body in (("table.py study", markdown_table(records)),
                         ("table.py claims", claim_lines(records)), ("table.py history", history_table())):
        page = spliced(page, marker, body)
    headline = "\n".join([*TABLE_HEADER, row_line("main", "the main command", records)])
    return {PAGE: page, FRONT_DOOR: spliced(FRONT_DOOR.read_text(), "table.py headline", headline)}


# ----------------------------------------------------------------------------- the records

def read_records(path):
    """The records of a .jsonl file ([] before it exists)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def saved_args(out_dir):
    """A run's args.json, less train.FREE_ON_RESUME's paths and speed flags; teachers named by
    their run folders' names (the runs folder itself is the machine's, not the run's)."""
    if not (out_dir / "args.json").is_file():  # an --eval_only run trains nothing and saves no args.json
        return {}
    args = {k: v for k, v in json.loads((out_dir / "args.json").read_text()).items() if k not in FREE_ON_RESUME}
    if args.get("teachers"):
        args["teachers"] = [Path(t).name for t in args["teachers"]]
    return args


def by_run(records):
    return {(r["row"], r["seed"]): r for r in records}


def runs_record(runs_dir, saved_before):
    """One record per finished run: from its own files in runs_dir, else its record in
    `saved_before` ((row, seed) -> record), since runs/ is not part of the repository, and a
    fresh clone must neither lose the saved results nor print tables without them. A run being
    re-run (its folder there, its scores.json not yet) keeps its record until it finishes."""
    records = []
    for name in FLAGS:
        for seed in seeds_of(name):
            out_dir = runs_dir / run_name(name, seed)
            if not (out_dir / "scores.json").is_file():
                if (name, seed) in saved_before:
                    records.append(saved_before[name, seed])
                continue
            records.append({"row": name, "seed": seed, "run": LABELS[name], "command": row_command(name),
                            "args": saved_args(out_dir),
                            "best": json.loads((out_dir / "scores.json").read_text()),
                            "epochs": read_metrics(out_dir)})
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder with the CS224N task files")
    p.add_argument("--runs_dir", default="runs/study", help="where the rows' runs go")
    p.add_argument("--only", default=None, help="comma list of row names to run, in this order (default: every row)")
    p.add_argument("--seeds", default=None, help=f"comma list of the seeds to run (default: all of {SEEDS})")
    p.add_argument("--dry_run", action="store_true", help="run nothing, print the tables of the finished (and saved) runs")
    p.add_argument("--write_runs", action="store_true",
                   help="also write results/study-runs.jsonl: every finished run's flags and metrics")
    p.add_argument("--write_pages", action="store_true", help="also write the tables and verdicts into "
                   "results/README.md and the main command's row into README.md (and --write_runs first)")
    p.add_argument("--history", action="store_true", help="print the rows of earlier defaults (history.jsonl) only")
    args = p.parse_args()
    if args.history:
        print(history_table())
        return
    runs_dir, data_dir = (ROOT / args.runs_dir).resolve(), Path(args.data_dir).resolve()
    only = list(FLAGS) if args.only is None else args.only.split(",")
    unknown = sorted(set(only) - set(FLAGS))
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {', '.join(FLAGS)}")
    seeds = [str(seed) for seed in SEEDS] if args.seeds is None else args.seeds.split(",")
    if not set(seeds) <= {str(seed) for seed in SEEDS}:
        p.error(f"--seeds: choose from {', '.join(map(str, SEEDS))}")
    saved = by_run(read_records(STUDY_RUNS))
    if not args.dry_run:
        for name in only:  # in the order given, each row's seeds in turn
            for seed in [seed for seed in seeds_of(name) if str(seed) in seeds]:
                run_unfinished(name, seed, runs_dir, data_dir, saved)
    records = runs_record(runs_dir, saved)
    if args.write_runs or args.write_pages:  # the pages show what the records say (tests/test_results_table.py)
        STUDY_RUNS.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {STUDY_RUNS.relative_to(ROOT)} ({len(records)} runs)", file=sys.stderr)
    runs = by_run(records)
    print(markdown_table(runs))
    print()
    print(claim_lines(runs))
    if args.write_pages:
        for path, text in pages(runs).items():
            path.write_text(text)
        print(f"wrote the tables into {PAGE.relative_to(ROOT)} and {FRONT_DOOR.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
