"""MLflow -> the paper's tables (markdown, LaTeX, CSV) and figures (PNG).

    python -m reasoning_rl.report                                   # every finished run in ./mlflow.db
    reasoning-rl-report --sweep-dir multirun/2026-11-24/05-28-17    # the console script, the same thing
    python -m reasoning_rl.report --sweep-dir multirun/2026-11-24/05-28-17 --paper --out reports/sft_table
    python -m reasoning_rl.report --tracking-uri http://127.0.0.1:5000 --parent <run id of a sweep>

A run's row of the paper's tables follows from its tags (algo, reward, init), so any run lands in the right row,
whether a sweep file (``row=orm_ei``) or a plain multirun (``algo=ei,ppo reward=sparse,orm``) made it. Rows group
the runs of one (row, init, model, task) over seeds: a cell is the mean, with ± the sample standard deviation when
there are several seeds. Columns are the paper's metrics, one block per model, as in DESIGN.md. With ``--paper`` the
paper's Llama-2 7B and 13B numbers follow ours in each block.

Written to ``--out``: ``table_<init>_<task>.{md,tex}`` per table, ``runs.csv`` (one line per run: tags and final
metrics, the numbers behind every cell), ``sample_complexity.png`` (accuracy against samples drawn, EI vs PPO)
and ``ei_rounds.png`` (EI's accuracy after each round), and ``report.md`` with every table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from reasoning_rl.launch.sweep import SWEEPS_TAG

METRICS = {  # column label -> MLflow metric
    "maj@1": "eval/maj_at_1",
    "maj@K": "eval/maj_at_k",
    "rerank@K": "eval/rerank_at_k",
    "pass@K": "eval/pass_at_k",
}
AXES = ["algo", "reward", "init", "model", "task", "seed"]

# (algo, reward) -> the paper's row; algo=none is "SFT" or "Prompted" depending on the init.
ROWS = {
    ("ei", "sparse"): "EI",
    ("ei", "orm"): "ORM EI",
    ("ei", "orm_dense"): "Dense ORM EI",
    ("rcrl", "sparse"): "RCRL",
    ("rcrl", "orm"): "ORM RCRL",
    ("ppo", "sparse"): "Sparse PPO",
    ("ppo", "dense"): "Dense PPO",
    ("ppo", "orm"): "Sparse ORM PPO",
    ("ppo", "orm_dense"): "Dense ORM PPO",
    # beyond the paper (algos/grpo.py); other rewards fall back to "<algo> <reward>", after these
    ("grpo", "sparse"): "GRPO",
    ("rloo", "sparse"): "RLOO",
    ("dr_grpo", "sparse"): "Dr. GRPO",
}
ROW_ORDER = ["SFT", "Prompted", "EI", "ORM EI", "Dense ORM EI", "RCRL", "ORM RCRL", "Sparse PPO", "Dense PPO",
             "Sparse ORM PPO", "Dense ORM PPO", "GRPO", "RLOO", "Dr. GRPO"]  # fmt: skip
# algo -> the metric of samples drawn so far (the sample-complexity figure's x-axis); GRPO's options share one prefix
SAMPLES_DRAWN = {"ei": "train/ei_samples_drawn", "ppo": "train/ppo_samples_drawn", "grpo": "train/grpo_samples_drawn",
                 "rloo": "train/grpo_samples_drawn", "dr_grpo": "train/grpo_samples_drawn"}  # fmt: skip

# The paper's GSM8K test results (Havrilla et al. 2024, tables 1 and 2; DESIGN.md), maj@1, maj@K, rerank@K, pass@K
# for Llama-2 7B and 13B. K = 96 from the SFT init; K = n from the pretrained init.
PAPER: dict[str, dict[str, dict[str, tuple[float, float, float, float]]]] = {
    "sft": {
        "SFT": {"7b": (0.41, 0.47, 0.54, 0.72), "13b": (0.48, 0.53, 0.68, 0.84)},
        "EI": {"7b": (0.48, 0.55, 0.64, 0.80), "13b": (0.53, 0.59, 0.71, 0.88)},
        "ORM EI": {"7b": (0.48, 0.54, 0.65, 0.81), "13b": (0.53, 0.58, 0.71, 0.87)},
        "ORM RCRL": {"7b": (0.45, 0.50, 0.54, 0.73), "13b": (0.51, 0.56, 0.69, 0.83)},
        "Sparse PPO": {"7b": (0.44, 0.49, 0.58, 0.77), "13b": (0.51, 0.55, 0.67, 0.85)},
        "Dense PPO": {"7b": (0.43, 0.47, 0.53, 0.71), "13b": (0.50, 0.54, 0.65, 0.81)},
        "Sparse ORM PPO": {"7b": (0.46, 0.51, 0.59, 0.79), "13b": (0.51, 0.55, 0.67, 0.83)},
        "Dense ORM PPO": {"7b": (0.46, 0.52, 0.59, 0.76), "13b": (0.51, 0.55, 0.67, 0.83)},
    },
    "pretrained": {
        "Prompted": {"7b": (0.05, 0.14, 0.17, 0.22), "13b": (0.03, 0.18, 0.24, 0.27)},
        "EI": {"7b": (0.31, 0.35, 0.39, 0.45), "13b": (0.40, 0.47, 0.63, 0.83)},
        "ORM EI": {"7b": (0.28, 0.33, 0.37, 0.42), "13b": (0.37, 0.43, 0.59, 0.76)},
        "Sparse PPO": {"7b": (0.32, 0.37, 0.41, 0.50), "13b": (0.41, 0.48, 0.65, 0.83)},
        "Sparse ORM PPO": {"7b": (0.29, 0.34, 0.40, 0.49), "13b": (0.38, 0.44, 0.62, 0.81)},
        "Dense ORM PPO": {"7b": (0.29, 0.35, 0.41, 0.50), "13b": (0.39, 0.45, 0.64, 0.82)},
    },
}


class ReportError(ValueError):
    """Nothing to report (no store, no runs); the message says what to check."""


def row_name(algo: str, reward: str, init: str) -> str:
    if algo == "none":
        return "SFT" if init == "sft" else "Prompted"
    return ROWS.get((algo, reward), f"{algo} {reward}")


# ------------------------------------------------------------------------------------------- reading MLflow


def read_runs(tracking_uri: str, experiment: str, parent: str | None = None) -> pd.DataFrame:
    """One line per finished job run: run_id, the axes, K, the final eval metrics, and the paper's row."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ReportError(f"no experiment '{experiment}' in {tracking_uri}; pass --tracking-uri / --experiment.")
    finished = "attributes.status = 'FINISHED'"
    if parent is None:
        found = mlflow.search_runs(experiment_names=[experiment], filter_string=finished, output_format="pandas")
    else:  # the sweep's children, and its jobs that found their run done or resumed it (sweep.join_sweep)
        queries = [f"tags.mlflow.parentRunId = '{parent}'", f"tags.{SWEEPS_TAG} LIKE '%{parent}%'"]
        frames = [mlflow.search_runs(experiment_names=[experiment], filter_string=f"{finished} and {query}",
                                     output_format="pandas") for query in queries]  # fmt: skip
        frames = [frame for frame in frames if not frame.empty]
        found = pd.concat(frames).drop_duplicates("run_id") if frames else pd.DataFrame()
    if "tags.algo" in found:
        found = found[found["tags.algo"].notna()]  # sweep parent runs carry no algo tag
    if found.empty:
        where = f"children of sweep run {parent}" if parent else "finished runs"
        raise ReportError(f"no {where} in experiment '{experiment}' at {tracking_uri}.")
    runs = pd.DataFrame({axis: found[f"tags.{axis}"] for axis in AXES})
    runs.insert(0, "run_id", found["run_id"])
    runs["K"] = pd.to_numeric(found.get("params.eval.k"), errors="coerce")
    for label, metric in METRICS.items():
        runs[label] = found.get(f"metrics.{metric}", float("nan"))
    runs["row"] = [row_name(a, r, i) for a, r, i in zip(runs["algo"], runs["reward"], runs["init"], strict=True)]
    runs["start_time"] = found["start_time"]
    # A config run twice (e.g. resume=false) counts once: its latest run.
    runs = runs.sort_values("start_time").drop_duplicates(["row", "init", "model", "task", "seed"], keep="last")
    return runs.drop(columns="start_time").reset_index(drop=True)


def metric_curves(tracking_uri: str, runs: pd.DataFrame, x_metric: dict[str, str]) -> pd.DataFrame:
    """Per run and eval step: the step, samples drawn so far (``x_metric[algo]``, 0 at step 0) and the metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    rows = []
    for run in runs.itertuples():
        if run.algo not in x_metric:
            continue
        drawn = {m.step: m.value for m in client.get_metric_history(run.run_id, x_metric[run.algo])}
        drawn[0] = 0.0
        history = {label: {m.step: m.value for m in client.get_metric_history(run.run_id, metric)}
                   for label, metric in METRICS.items()}  # fmt: skip
        for step in sorted(history["maj@1"]):
            rows.append({"run_id": run.run_id, "row": run.row, "init": run.init, "model": run.model,
                         "task": run.task, "seed": run.seed, "step": step, "samples": drawn.get(step, math.nan),
                         **{label: values.get(step, math.nan) for label, values in history.items()}})  # fmt: skip
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- tables


def cell(values: pd.Series) -> str:
    """'0.480 ± 0.020' over seeds ('0.480' for one seed, '–' for none)."""
    values = values.dropna()
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    if len(values) > 1:
        return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
    return "–"


def paper_table(runs: pd.DataFrame, init: str, task: str, *, with_paper: bool) -> pd.DataFrame:
    """The paper's layout for one (init, task): rows in the paper's order, columns "<metric> <model>", and with
    ``with_paper`` the paper's Llama-2 7B / 13B numbers after ours ("<metric> paper 7b")."""
    subset = runs[(runs["init"] == init) & (runs["task"] == task)]
    models = sorted(subset["model"].unique())
    rows = [r for r in ROW_ORDER if r in set(subset["row"])] + sorted(set(subset["row"]) - set(ROW_ORDER))
    table = pd.DataFrame(index=pd.Index(rows, name="row"))
    for metric_index, label in enumerate(METRICS):
        for model in models:
            table[f"{label} {model}"] = [cell(subset[(subset["row"] == r) & (subset["model"] == model)][label])
                                         for r in rows]  # fmt: skip
        if with_paper:
            for paper_model in ("7b", "13b"):
                numbers = [PAPER.get(init, {}).get(r, {}).get(paper_model) for r in rows]
                table[f"{label} paper {paper_model}"] = [f"{n[metric_index]:.2f}" if n else "–" for n in numbers]
    seeds = subset.groupby("row")["seed"].nunique()
    table["seeds"] = [str(seeds.get(r, 0)) for r in rows]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    header = [table.index.name or "", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(index), *map(str, values)]) + " |" for index, values in table.iterrows()]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, caption: str) -> str:
    def escape(text: str) -> str:
        return str(text).replace("±", r"$\pm$").replace("@", r"@").replace("_", r"\_").replace("–", "--")

    columns = "l" + "r" * len(table.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{escape(caption)}}}", rf"\begin{{tabular}}{{{columns}}}",
             r"\toprule", " & ".join([escape(table.index.name or ""), *map(escape, table.columns)]) + r" \\",
             r"\midrule"]  # fmt: skip
    lines += [" & ".join([escape(i), *map(escape, v)]) + r" \\" for i, v in table.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ figures


def plot_curves(curves: pd.DataFrame, x: str, path: Path, title: str, xlabel: str) -> Path:
    """maj@1 (solid) and pass@K (dashed) against ``x``, one colour per (row, init, model), mean over seeds."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    if curves.empty:
        axis.text(0.5, 0.5, "no runs with evaluations along the way", ha="center", va="center")
    else:
        groups = curves.groupby(["row", "init", "model", "task", "step"], as_index=False).mean(numeric_only=True)
        for (row, init, model, task), line in groups.groupby(["row", "init", "model", "task"]):
            line = line.sort_values(x)
            (drawn,) = axis.plot(line[x], line["maj@1"], marker="o", label=f"{row} ({init}, {model}, {task}) maj@1")
            if line["pass@K"].notna().any():
                axis.plot(line[x], line["pass@K"], linestyle="--", color=drawn.get_color(), alpha=0.6,
                          label=f"{row} ({init}, {model}) pass@K")  # fmt: skip
    axis.set(title=title, xlabel=xlabel, ylabel="accuracy (test)")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # rounds, steps and samples are counts
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------- main


def write_report(
    tracking_uri: str,
    out: Path,
    *,
    experiment: str = "reasoning-rl",
    parent: str | None = None,
    with_paper: bool = False,
) -> dict[str, Path]:
    """Write every table and both figures to ``out``; returns the files by name."""
    out.mkdir(parents=True, exist_ok=True)
    runs = read_runs(tracking_uri, experiment, parent)
    written: dict[str, Path] = {}
    runs.to_csv(out / "runs.csv", index=False)
    written["runs.csv"] = out / "runs.csv"
    sections = [f"# Results from {tracking_uri}" + (f", sweep run {parent}" if parent else "") + "\n"]
    for (init, task), _ in runs.groupby(["init", "task"]):
        table = paper_table(runs, init, task, with_paper=with_paper)
        k = ", ".join(str(int(v)) for v in sorted(runs[runs["init"] == init]["K"].dropna().unique()))
        caption = f"{task}, {init} init (K = {k}); mean ± std over seeds"
        for suffix, text in (("md", to_markdown(table)), ("tex", to_latex(table, caption))):
            path = out / f"table_{init}_{task}.{suffix}"
            path.write_text(text)
            written[path.name] = path
        sections.append(f"## {caption}\n\n{to_markdown(table)}")
    curves = metric_curves(tracking_uri, runs, SAMPLES_DRAWN)
    written["sample_complexity.png"] = plot_curves(
        curves, "samples", out / "sample_complexity.png", "Sample complexity: EI, PPO and beyond", "samples drawn"
    )
    ei_curves = curves[curves["row"].str.contains("EI")] if not curves.empty else curves
    written["ei_rounds.png"] = plot_curves(ei_curves, "step", out / "ei_rounds.png", "Expert Iteration", "round")
    (out / "report.md").write_text("\n".join(sections) + "\n![](sample_complexity.png)\n\n![](ei_rounds.png)\n")
    written["report.md"] = out / "report.md"
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reasoning-rl-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="MLflow store; default $MLFLOW_TRACKING_URI, else ./mlflow.db")
    parser.add_argument("--experiment", default="reasoning-rl", help="MLflow experiment name")
    parser.add_argument("--parent", help="only the jobs of this sweep (its parent run id)")
    parser.add_argument("--sweep-dir", type=Path, help="only the jobs of the multirun in this directory")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output directory (default: reports)")
    parser.add_argument("--paper", action="store_true", help="put the paper's Llama-2 numbers beside ours")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from reasoning_rl.launch.sweep import read_sweep_run

    args = parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    parent = args.parent
    if args.sweep_dir is not None:
        sweep = read_sweep_run(args.sweep_dir)
        if sweep is None:
            print(f"Error: {args.sweep_dir} holds no mlflow_sweep.json: not a multirun directory.", file=sys.stderr)
            return 2
        uri, parent = args.tracking_uri or sweep.tracking_uri, sweep.run_id
    try:
        written = write_report(uri, args.out, experiment=args.experiment, parent=parent, with_paper=args.paper)
    except ReportError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text())
    print("Wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
