"""The results page's two figures, drawn from results/study-runs.jsonl (what results/table.py saves).

    python results/plot.py          # writes results/epochs.png and results/comparisons.png

epochs.png: the dev score after every epoch of the main variants, one thin line per seed and a
thick one through the seeds' means, a panel per score (SST, PARA, STS, overall).
comparisons.png: each section of the study's table as a panel: every seed's best-epoch score as a
dot, the seeds' mean as a bar across them, so that a difference can be read against the spread.
A multi-task row shows its overall score, a single-task row its task's.

matplotlib is a results-only dependency (requirements-dev.txt), never one of train.py's.
"""
import importlib.util
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("table", HERE / "table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)

EPOCH_ROWS = ["main", "sum-roundrobin", "fls-roundrobin", "baseline", "student-anneal", "student-mix"]
SCORES = [("sst", "SST acc"), ("para", "PARA acc"), ("sts", "STS r"), ("overall", "overall")]


def runs_by_row(records):
    """{row: [record, ...]} in seed order."""
    rows = {}
    for record in sorted(records, key=lambda r: table.SEEDS.index(r["seed"])):
        rows.setdefault(record["row"], []).append(record)
    return rows


def row_score(record):
    """The score a row is judged by in comparisons.png: overall with several tasks, else its task's."""
    dev = record["best"]["dev"]
    return record["best"]["overall"] if len(dev) > 1 else next(iter(dev.values()))


def plot_epochs(records, path):
    rows = runs_by_row(records)
    figure, axes = plt.subplots(1, len(SCORES), figsize=(16, 4), constrained_layout=True)
    for row in [r for r in EPOCH_ROWS if r in rows]:
        colour = None
        curves = [[epoch["dev"] | {"overall": epoch["overall"]} for epoch in run["epochs"]] for run in rows[row]]
        for ax, (score, title) in zip(axes, SCORES):
            for curve in curves:
                line, = ax.plot(range(1, len(curve) + 1), [e[score] for e in curve], lw=0.8, alpha=0.4, color=colour)
                colour = line.get_color()
            length = min(len(c) for c in curves)
            means = [statistics.mean(c[i][score] for c in curves) for i in range(length)]
            ax.plot(range(1, length + 1), means, lw=2.5, color=colour, marker="o",
                    label=f"{row} ({len(curves)} seed{'s' * (len(curves) > 1)})")
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylabel("dev score")
    axes[-1].legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return figure


def plot_comparisons(records, path):
    rows = runs_by_row(records)
    sections = [(title, [name for name, _, _ in members if name in rows]) for title, members in table.SECTIONS]
    sections = [(title, names) for title, names in sections if names]
    heights = [len(names) + 1.5 for _, names in sections]  # a panel's height grows with its rows
    figure, axes = plt.subplots(len(sections), 1, figsize=(9, 0.35 * sum(heights) + 0.5), constrained_layout=True,
                                squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (title, names) in zip(axes[:, 0], sections):
        for y, name in enumerate(names):
            scores = [row_score(run) for run in rows[name]]
            ax.scatter(scores, [y] * len(scores), s=18, color="tab:blue", zorder=3)
            ax.plot([statistics.mean(scores)] * 2, [y - 0.3, y + 0.3], color="black", lw=2)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("dev score of the best epoch (multi-task rows: overall; single-task rows: their task's)")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return figure


def main():
    records = table.read_records(table.STUDY_RUNS)
    plot_epochs(records, HERE / "epochs.png")
    plot_comparisons(records, HERE / "comparisons.png")
    print(f"wrote results/epochs.png and results/comparisons.png from {len(records)} runs")


if __name__ == "__main__":
    main()
