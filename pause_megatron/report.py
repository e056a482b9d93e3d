"""The recipe's report, rebuilt from the MLflow store alone: variant x task table, ablations, plots.

Every evaluation stage logs one MLflow run tagged with its recipe, variant, task, seed, M_ft, M_inf,
placement, ablation and the stage's identity, and the task's metrics as `<task>/<metric>`. The report reads
those runs, so `pause-megatron recipe report` can rebuild it anywhere the store is. It covers exactly the
evaluations the recipe plans, each from the run tagged with the stage's current identity (a score of an
earlier configuration is never used); one whose score MLflow lacks (its logging failed, or it ran before
the store was changed) is read from the result.json of the stage, if it finished with that identity, and if
that is missing too the report fails, naming the stages, rather than average over fewer seeds unnoticed.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from typing import Optional

from pause_megatron.tasks import TASKS

PERCENT = 100.0  # scores are fractions in lm-eval; the paper prints percentages


def evaluation_rows(tracking, identities: set) -> dict[str, dict]:
    """Evaluation runs tagged with one of `identities` (stage identities): the newest run's row per identity.

    A run of an identity no longer planned (the stage has changed since) is never taken.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'evaluate'", max_results=50000)
    newest: dict[str, dict] = {}
    for run in sorted(runs, key=lambda x: x.info.start_time):
        t = run.data.tags
        task = t.get("task")
        metric = TASKS[task].metric if task in TASKS else None
        value = run.data.metrics.get(f"{task}/{metric}")
        if value is None or t.get("stage_identity") not in identities:
            continue
        newest[t["stage_identity"]] = {
            "variant": t["variant"], "task": task, "seed": int(t["seed"]), "m_ft": int(t["m_ft"]),
            "m_inf": int(t["m_inf"]), "placement": t["placement"], "ablation": t["ablation"],
            "pause_ratio": _ratio(t), "metric": metric, "value": value * PERCENT}
    return newest


def _ratio(tags: dict) -> Optional[float]:
    """The pretraining pause ratio of a PausePT model's evaluation (None for StdPT)."""
    return float(tags["pause_ratio"]) if tags.get("pause_ratio") is not None else None


class ReportError(RuntimeError):
    """Planned evaluations have no score, in MLflow or in their stage's result file."""


def row_from_result(tags: dict, path: str) -> Optional[dict]:
    """An evaluation row from a stage's result.json (its labels from the plan), or None if it has no score."""
    import json

    if not os.path.exists(path):
        return None
    with open(path) as fh:
        scores = json.load(fh).get("scores", {})
    task = tags["task"]
    metric = TASKS[task].metric
    value = scores.get(task, {}).get(metric)
    if value is None:
        return None
    return {"variant": tags["variant"], "task": task, "seed": int(tags["seed"]), "m_ft": int(tags["m_ft"]),
            "m_inf": int(tags["m_inf"]), "placement": tags["placement"], "ablation": tags["ablation"],
            "pause_ratio": _ratio(tags), "metric": metric, "value": value * PERCENT}


def planned_rows(tracking, stages: list) -> list[dict]:
    """The rows of the planned evaluate stages: the MLflow run tagged with the stage's identity, else the
    result.json of a stage that finished with that identity; ReportError if neither."""
    from pause_megatron.recipe import RESULT, is_done

    by_identity = evaluation_rows(tracking, {s.identity for s in stages})
    rows, missing = [], []
    for stage in stages:
        row = by_identity.get(stage.identity)
        if row is None and is_done(stage):
            row = row_from_result(stage.tags, os.path.join(stage.out, RESULT))
        if row is None:
            missing.append(stage.key)
        else:
            rows.append(row)
    if missing:
        raise ReportError(f"{len(missing)} planned evaluation(s) have no score of their current configuration in "
                          f"MLflow ({tracking.uri}) nor a {RESULT} of a finished run in their output: "
                          + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "") + "; rerun them")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], note: str = "") -> str:
    if not values:
        return "—"
    mean, std = _mean_std(values)
    return f"{mean:.1f} ± {std:.1f} (n={len(values)}){note}"


def main_table(rows: list[dict], variants: list[str]) -> tuple[str, dict]:
    """Markdown table (mean ± std over seeds; for PauseFT the better M_ft per task, as the paper reports)."""
    main = [r for r in rows if r["ablation"] == "main" and r["m_inf"] == r["m_ft"]]
    tasks = sorted({r["task"] for r in main})
    best: dict[tuple[str, str], int] = {}
    lines = ["| task | metric | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for task in tasks:
        cells = []
        for v in variants:
            by_m = defaultdict(list)
            for r in main:
                if r["task"] == task and r["variant"] == v:
                    by_m[r["m_ft"]].append(r["value"])
            if not by_m:
                cells.append("—")
                continue
            m = max(by_m, key=lambda k: statistics.fmean(by_m[k]))
            best[(v, task)] = m
            cells.append(_cell(by_m[m], f" (M_ft={m})" if v.endswith("PauseFT") else ""))
        lines.append(f"| {task} | {TASKS[task].metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines), best


def m_ft_table(rows: list[dict]) -> str:
    pause = [r for r in rows if r["ablation"] == "main" and r["placement"] == "append" and r["m_inf"] == r["m_ft"]]
    m_values = sorted({r["m_ft"] for r in pause})
    if len(m_values) < 2:
        return ""
    lines = ["| variant | task | " + " | ".join(f"M_ft={m}" for m in m_values) + " |",
             "|---|---|" + "---|" * len(m_values)]
    for v, task in sorted({(r["variant"], r["task"]) for r in pause}):
        cells = [_cell([r["value"] for r in pause if (r["variant"], r["task"], r["m_ft"]) == (v, task, m)])
                 for m in m_values]
        lines.append(f"| {v} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def m_inf_series(rows: list[dict], best: dict) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """(variant, task) -> [(M_inf, mean, std)] for the model with the better M_ft."""
    series = {}
    for (v, task), m in best.items():
        pts = defaultdict(list)
        for r in rows:
            if (r["variant"], r["task"], r["m_ft"], r["placement"]) == (v, task, m, "append") and \
                    r["ablation"] in ("main", "m_inf"):
                pts[r["m_inf"]].append(r["value"])
        if len(pts) > 1:
            series[(v, task)] = [(mi, *_mean_std(vals)) for mi, vals in sorted(pts.items())]
    return series


def comparison_table(rows: list[dict], *, ablation: str, base_variant: str, label) -> str:
    """The ablation's scores next to the same variant's main scores, per task."""
    abl = [r for r in rows if r["ablation"] == ablation]
    if not abl:
        return ""
    settings = sorted({(r["placement"], r["m_inf"], r["m_ft"]) for r in abl})
    lines = [f"| task | {base_variant} | " + " | ".join(label(s) for s in settings) + " |",
             "|---|---|" + "---|" * len(settings)]
    for task in sorted({r["task"] for r in abl}):
        base = [r["value"] for r in rows if r["ablation"] == "main" and r["variant"] == base_variant
                and r["task"] == task and r["m_inf"] == r["m_ft"]]
        cells = [_cell([r["value"] for r in abl if r["task"] == task and (r["placement"], r["m_inf"], r["m_ft"]) == s])
                 for s in settings]
        lines.append(f"| {task} | {_cell(base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prepend_table(rows: list[dict]) -> str:
    """PausePT_PauseFT with prepended pauses against appended ones at the same M_ft (like with like)."""
    pre = [r for r in rows if r["ablation"] == "prepend"]
    if not pre:
        return ""
    app = [r for r in rows if r["ablation"] == "main" and r["variant"] == "PausePT_PauseFT"
           and r["placement"] == "append" and r["m_inf"] == r["m_ft"]]
    lines = ["| task | M_ft | appending | prepending |", "|---|---|---|---|"]
    for task, m in sorted({(r["task"], r["m_ft"]) for r in pre}):
        cells = [_cell([r["value"] for r in group if (r["task"], r["m_ft"]) == (task, m)]) for group in (app, pre)]
        lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_series(rows: list[dict]) -> dict[tuple[str, str, int], list[tuple[float, float, float]]]:
    """(variant, task, M_ft) -> [(pause ratio, mean, std)] when the recipe sweeps the ratio: the PausePT models
    of the main run and the sweep, and StdPT as ratio 0 (PausePT with no pauses is StdPT: StdPT_PauseFT is the
    point at 0 of PausePT_PauseFT), finetuned and evaluated alike (M_inf = M_ft, the main placement)."""
    if not any(r["ablation"] == "pause_ratio" for r in rows):
        return {}
    pts: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["ablation"] not in ("main", "pause_ratio") or r["m_inf"] != r["m_ft"]:
            continue
        pt, ft = r["variant"].split("_")
        ratio = 0.0 if pt == "StdPT" else r.get("pause_ratio")
        if ratio is not None:
            pts[(f"PausePT_{ft}", r["task"], r["m_ft"])][ratio].append(r["value"])
    return {k: [(ratio, *_mean_std(v)) for ratio, v in sorted(by.items())] for k, by in sorted(pts.items())
            if len(by) > 1}


def plot_ratio(series: dict, path: str) -> Optional[str]:
    """Score against the pretraining pause ratio, one panel per task, one line per variant and M_ft."""
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for _, task, _ in series})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (v, t, m), pts in series.items():
            if t == task:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{v} (M_ft={m})" if m else v)
        ax.set_title(task)
        ax.set_xlabel("pretraining pause ratio (M_pt / N; 0: StdPT)")
        ax.set_ylabel(f"{TASKS[task].metric} (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_m_inf(series: dict, path: str) -> Optional[str]:
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for _, task in series})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (v, t), pts in sorted(series.items()):
            if t == task:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=v)
        ax.set_title(task)
        ax.set_xlabel("M_inf (pauses at inference)")
        ax.set_ylabel(f"{TASKS[task].metric} (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_m_ft(rows: list[dict], path: str) -> Optional[str]:
    pause = [r for r in rows if r["ablation"] == "main" and r["placement"] == "append" and r["m_inf"] == r["m_ft"]]
    m_values = sorted({r["m_ft"] for r in pause})
    if len(m_values) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["variant"], r["task"]) for r in pause})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 3.5))
    width = 0.8 / len(m_values)
    for i, m in enumerate(m_values):
        means = [statistics.fmean([r["value"] for r in pause if (r["variant"], r["task"], r["m_ft"]) == (v, t, m)]
                                  or [0.0]) for v, t in keys]
        ax.bar([k + i * width for k in range(len(keys))], means, width, label=f"M_ft={m}")
    ax.set_xticks([k + width * (len(m_values) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{t}\n{v}" for v, t in keys], fontsize=6)
    ax.set_ylabel("score (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(recipe, *, parent_run_id: Optional[str] = None, log=print) -> str:
    """Write <output_dir>/report/{report.md, m_inf.png, m_ft.png, pause_ratio.png} from MLflow; log them on the
    parent run.

    Raises ReportError when a planned evaluation has no score (see the module's docstring).
    """
    from pause_megatron.recipe import full_plan

    rows = planned_rows(recipe.tracking, [s for s in full_plan(recipe) if s.kind == "evaluate"])
    out = os.path.join(recipe.output_dir, "report")
    os.makedirs(out, exist_ok=True)
    table, best = main_table(rows, list(recipe.variants))
    parts = [f"# {recipe.name}: results", "",
             f"{len(rows)} evaluation runs from MLflow ({recipe.tracking.uri}, experiment "
             f"{recipe.tracking.experiment}). Scores in %, mean ± std over n seeds; for PauseFT variants the better "
             "M_ft per task, chosen on the reported evaluation split itself (as the paper reports; not a "
             "held-out choice).", "", "## Variant × task", "", table]
    mft = m_ft_table(rows)
    if mft:
        parts += ["", "## M_ft", "", mft, "", "![M_ft](m_ft.png)"]
    series = m_inf_series(rows, best)
    if series:
        parts += ["", "## M_inf robustness", "", "| variant | task | " + "M_inf: score |", "|---|---|---|"]
        parts += [f"| {v} | {t} | " + ", ".join(f"{mi}: {mean:.1f}" for mi, mean, _ in pts) + " |"
                  for (v, t), pts in sorted(series.items())]
        parts += ["", "![M_inf](m_inf.png)"]
    ratios = ratio_series(rows)
    if ratios:
        parts += ["", "## Pretraining pause ratio (PausePT)", "",
                  "M_pt / N; ratio 0 is StdPT (pretrained without pauses), finetuned alike.", "",
                  "| variant | task | M_ft | ratio: score |", "|---|---|---|---|"]
        parts += [f"| {v} | {t} | {m} | " + ", ".join(f"{x:g}: {mean:.1f} ± {std:.1f}" for x, mean, std in pts) + " |"
                  for (v, t, m), pts in ratios.items()]
        parts += ["", "![pause ratio](pause_ratio.png)"]
    prepend = prepend_table(rows)
    if prepend:
        parts += ["", "## Appending vs prepending pauses (PausePT_PauseFT)", "", prepend]
    filler = comparison_table(rows, ablation="filler", base_variant="StdPT_StdFT",
                              label=lambda s: f"'.' x {s[1]}")
    if filler:
        parts += ["", "## Filler '.' at inference (StdPT_StdFT)", "", filler]
    text = "\n".join(parts) + "\n"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text)
    plots = [plot_m_inf(series, os.path.join(out, "m_inf.png")), plot_m_ft(rows, os.path.join(out, "m_ft.png")),
             plot_ratio(ratios, os.path.join(out, "pause_ratio.png"))]
    if parent_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=recipe.tracking.uri)
        for path in [os.path.join(out, "report.md"), *[p for p in plots if p]]:
            client.log_artifact(parent_run_id, path, "report")
    log(text)
    return text
