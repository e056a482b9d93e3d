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

import math
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
        n, sd = run.data.metrics.get(f"{task}/n"), run.data.metrics.get(f"{task}/{metric}_sd")
        newest[t["stage_identity"]] = {
            "variant": t["variant"], "task": task, "seed": int(t["seed"]), "m_ft": int(t["m_ft"]),
            "m_inf": int(t["m_inf"]), "placement": t["placement"], "ablation": t["ablation"],
            "pause_ratio": _ratio(t), "metric": metric, "value": value * PERCENT,
            "n": int(n) if n is not None else None, "sd": sd * PERCENT if sd is not None else None}
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
    n, sd = scores[task].get("n"), scores[task].get(f"{metric}_sd")
    return {"variant": tags["variant"], "task": task, "seed": int(tags["seed"]), "m_ft": int(tags["m_ft"]),
            "m_inf": int(tags["m_inf"]), "placement": tags["placement"], "ablation": tags["ablation"],
            "pause_ratio": _ratio(tags), "metric": metric, "value": value * PERCENT,
            "n": int(n) if n is not None else None, "sd": sd * PERCENT if sd is not None else None}


def planned_rows(tracking, stages: list) -> list[dict]:
    """The rows of the planned evaluate stages, in their order: the MLflow run tagged with the stage's identity,
    else the result.json of a stage that finished with that identity; ReportError if neither."""
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


Z95 = 1.959964  # two-sided 95% normal quantile
BINARY = ("acc", "exact_match")  # metrics scored 0 or 1 per document; CoQA's f1 is graded


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p (0..1) observed on n documents."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(rows: list[dict]) -> Optional[tuple[float, float]]:
    """95% interval (in %) of the mean score of `rows` (the seeds of one cell) over their evaluation documents.

    What it measures: how far the score could move on another draw of n documents, the noise that decides
    whether two variants evaluated on the same n rows differ. Seeds share the documents, so they do not add
    to n. Accuracy and exact match are 0/1 per document: the Wilson interval, which stays inside [0, 100] and
    keeps a sensible width at 0% or 100% on few rows (the normal one collapses to zero width there). A graded
    metric (CoQA's F1): the normal interval of a mean, mean ± 1.96 sd/sqrt(n), with the per-document sd.
    None when there is no interval to give (`no_interval` says why): the runs do not say how many documents
    they scored (evaluated before they logged it), they scored none, or a graded metric lacks its sd or n >= 2.
    """
    if no_interval(rows):
        return None
    n = min(r["n"] for r in rows)
    mean = statistics.fmean(r["value"] for r in rows)
    if rows[0]["metric"] in BINARY:
        lo, hi = wilson(mean / PERCENT, n)
        return lo * PERCENT, hi * PERCENT
    sds = [r["sd"] for r in rows if r.get("sd") is not None]
    half = Z95 * statistics.fmean(sds) / math.sqrt(n)
    return max(0.0, mean - half), min(PERCENT, mean + half)


def no_interval(rows: list[dict]) -> Optional[str]:
    """Why a cell's rows give no 95% interval (shown in its place), or None when they give one."""
    if not rows:
        return "no runs"
    if any(r.get("n") is None for r in rows):
        return "no interval: row count not logged"
    n = min(r["n"] for r in rows)
    if n == 0:
        return "no interval: no rows scored"
    if rows[0]["metric"] not in BINARY:
        if n < 2:
            return f"no interval (n={n})"
        if not any(r.get("sd") is not None for r in rows):
            return "no interval: per-document sd not logged"
    return None


def _cell(rows: list[dict], note: str = "") -> str:
    if not rows:
        return "—"
    mean, std = _mean_std([r["value"] for r in rows])
    ci = interval(rows)
    where = f"[{ci[0]:.1f}, {ci[1]:.1f}] " if ci else f"[{no_interval(rows)}] "
    seeds = f"{len(rows)} seed{'s' if len(rows) > 1 else ''}"
    return f"{mean:.1f} ± {std:.1f} {where}(n={_rows_label(rows)}, {seeds}){note}"


def _rows_label(rows: list[dict]) -> str:
    ns = {r.get("n") for r in rows}
    return "?" if None in ns else "/".join(str(n) for n in sorted(ns))


def overlap_notes(cells: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Per task (cells[task][variant] = rows), a line when the variants' 95% intervals overlap."""
    notes = []
    for task, by_variant in sorted(cells.items()):
        cis = {v: interval(rows) for v, rows in by_variant.items() if rows}
        cis = {v: ci for v, ci in cis.items() if ci is not None}
        if len(cis) < 2:
            continue
        names = sorted(cis)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                 if cis[a][0] <= cis[b][1] and cis[b][0] <= cis[a][1]]
        n = _rows_label([r for rows in by_variant.values() for r in rows])
        # Overlapping intervals do not show that two variants are equal, and all variants are scored on the same
        # documents (a paired comparison is sharper than two separate intervals): the line says only that this
        # table cannot tell them apart.
        if len(pairs) == len(names) * (len(names) - 1) // 2:
            notes.append(f"- **{task}: every variant's 95% interval overlaps every other's** (n={n} rows): these "
                         "differences are within the evaluation noise of n rows, so this table cannot rank the "
                         "variants; a paired comparison on the same documents (or more rows) would be needed.")
        elif pairs:
            notes.append(f"- {task}: intervals overlap ({'; '.join(f'{a} vs {b}' for a, b in pairs)}): these "
                         f"differences are within the evaluation noise of n={n} rows; a paired comparison on the "
                         "same documents would be needed to tell them apart.")
    return notes


def main_table(rows: list[dict], variants: list[str]) -> tuple[str, dict, dict]:
    """Markdown table (mean ± std over seeds, 95% interval over the rows; for PauseFT the better M_ft per task,
    as the paper reports); also the best M_ft per (variant, task) and the rows of each cell."""
    main = [r for r in rows if r["ablation"] == "main" and r["m_inf"] == r["m_ft"]]
    tasks = sorted({r["task"] for r in main})
    best: dict[tuple[str, str], int] = {}
    cells_rows: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    lines = ["| task | metric | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for task in tasks:
        cells = []
        for v in variants:
            by_m = defaultdict(list)
            for r in main:
                if r["task"] == task and r["variant"] == v:
                    by_m[r["m_ft"]].append(r)
            if not by_m:
                cells.append("—")
                continue
            m = max(by_m, key=lambda k: statistics.fmean(r["value"] for r in by_m[k]))
            best[(v, task)] = m
            cells_rows[task][v] = by_m[m]
            cells.append(_cell(by_m[m], f" (M_ft={m})" if v.endswith("PauseFT") else ""))
        lines.append(f"| {task} | {TASKS[task].metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines), best, dict(cells_rows)


def m_ft_table(rows: list[dict]) -> str:
    pause = [r for r in rows if r["ablation"] == "main" and r["placement"] == "append" and r["m_inf"] == r["m_ft"]]
    m_values = sorted({r["m_ft"] for r in pause})
    if len(m_values) < 2:
        return ""
    lines = ["| variant | task | " + " | ".join(f"M_ft={m}" for m in m_values) + " |",
             "|---|---|" + "---|" * len(m_values)]
    for v, task in sorted({(r["variant"], r["task"]) for r in pause}):
        cells = [_cell([r for r in pause if (r["variant"], r["task"], r["m_ft"]) == (v, task, m)])
                 for m in m_values]
        lines.append(f"| {v} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def m_inf_series(rows: list[dict], best: dict) -> dict[tuple[str, str], list[tuple[int, list[dict]]]]:
    """(label, task) -> [(M_inf, rows)]: the M_inf sweep of each model with the better M_ft, and the filler
    ablation ('.' x M at inference on StdPT_StdFT, from its M=0 main score)."""
    series = {}
    for (v, task), m in best.items():
        pts = defaultdict(list)
        for r in rows:
            if (r["variant"], r["task"], r["m_ft"], r["placement"]) == (v, task, m, "append") and \
                    r["ablation"] in ("main", "m_inf"):
                pts[r["m_inf"]].append(r)
        if len(pts) > 1:
            series[(f"{v} (M_ft={m})", task)] = sorted(pts.items())
    for task in sorted({r["task"] for r in rows if r["ablation"] == "filler"}):
        pts = defaultdict(list)
        for r in rows:
            if r["task"] == task and r["variant"] == "StdPT_StdFT" and (
                    r["ablation"] == "filler" or (r["ablation"] == "main" and r["m_inf"] == 0)):
                pts[r["m_inf"]].append(r)
        if len(pts) > 1:
            series[("StdPT_StdFT + '.' filler", task)] = sorted(pts.items())
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
        base = [r for r in rows if r["ablation"] == "main" and r["variant"] == base_variant
                and r["task"] == task and r["m_inf"] == r["m_ft"]]
        cells = [_cell([r for r in abl if r["task"] == task and (r["placement"], r["m_inf"], r["m_ft"]) == s])
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
        cells = [_cell([r for r in group if (r["task"], r["m_ft"]) == (task, m)]) for group in (app, pre)]
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def integer_axis(ax, xs: list[float]) -> None:
    """Integer ticks on the x axis (steps, pause counts). Matplotlib's integer locator falls back to fractional
    ticks when fewer than two integers are in view, as around a single point: the view is widened to hold three."""
    from matplotlib.ticker import MaxNLocator

    if xs and max(xs) - min(xs) < 2:
        ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_m_inf(series: dict, path: str) -> Optional[str]:
    """One panel per task: score against M_inf (and '.' filler count), 95% interval bars."""
    if not series:
        return None
    plt = _pyplot()
    tasks = sorted({task for _, task in series})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (label, t), pts in sorted(series.items()):
            if t != task:
                continue
            xs = [mi for mi, _ in pts]
            ys = [statistics.fmean(r["value"] for r in group) for _, group in pts]
            cis = [interval(group) for _, group in pts]
            err = [[y - (ci[0] if ci else y) for y, ci in zip(ys, cis)],
                   [(ci[1] if ci else y) - y for y, ci in zip(ys, cis)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        n = _rows_label([r for (_, t), p in series.items() if t == task for _, group in p for r in group])
        ax.set_title(f"{task} (n={n} documents)")
        ax.set_xlabel("pauses (or '.' fillers) at inference")
        integer_axis(ax, [mi for (_, t), pts in series.items() if t == task for mi, _ in pts])
        ax.set_ylabel(f"{TASKS[task].metric} (%), 95% interval")
        ax.set_ylim(-5, 105)
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
    plt = _pyplot()
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


# ---- training curves and stage times (from the stages' own MLflow runs) ------------------------------------

PRETRAIN_PANELS = (("train/loss", "training loss (non-pause targets)"),
                   ("val/loss", "validation loss (non-pause targets)"),
                   ("val/all_token_loss", "validation loss (all targets, pauses included)"))


def stage_runs(tracking, stages: list) -> dict[str, object]:
    """stage key -> the newest MLflow run tagged with the stage's current identity (stages without one are left out)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return {}
    by_identity = {}
    for run in sorted(client.search_runs([exp.experiment_id], max_results=50000), key=lambda x: x.info.start_time):
        by_identity[run.data.tags.get("stage_identity")] = run
    return {s.key: by_identity[s.identity] for s in stages if s.identity in by_identity}


def _history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def pretrain_curves(tracking, runs: dict, stages: list) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """"StdPT"/"PausePT" -> metric -> [(step, value)] for PRETRAIN_PANELS."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    curves = {}
    for s in stages:
        if s.kind == "pretrain" and s.key in runs:
            curves[s.tags["pretrain"]] = {k: _history(client, runs[s.key], k) for k, _ in PRETRAIN_PANELS}
    return curves


def finetune_curves(tracking, runs: dict, stages: list) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """task -> "variant (placement M_ft)" -> [(step, training loss averaged over the seeds)]."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    per = defaultdict(lambda: defaultdict(list))
    for s in stages:
        if s.kind == "finetune" and s.key in runs:
            t = s.tags
            label = t["variant"] + ("" if t["placement"] == "none" else f" ({t['placement']} M_ft={t['m_ft']})")
            per[t["task"]][label].append(dict(_history(client, runs[s.key], "train/loss")))
    curves = {}
    for task, by_label in per.items():
        for label, seeds in by_label.items():
            steps = sorted(set.intersection(*(set(h) for h in seeds)))
            if steps:
                curves.setdefault(task, {})[label] = [(k, statistics.fmean(h[k] for h in seeds)) for k in steps]
    return curves


def plot_curves(panels: list[tuple[str, str, dict[str, list[tuple[int, float]]]]], path: str) -> Optional[str]:
    """One panel per (title, y label, {line label: [(step, value)]}) that has data; None if none has."""
    panels = [p for p in panels if any(p[2].values())]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes[0], panels):
        for label, pts in sorted(lines.items()):
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=9)
        integer_axis(ax, [x for pts in lines.values() for x, _ in pts])
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wall_s(run) -> Optional[float]:
    """An evaluation's own measure (its MLflow run is made only after the scoring), else the run's duration."""
    if "perf/wall_s" in run.data.metrics:
        return run.data.metrics["perf/wall_s"]
    return (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None


def times_table(tracking, runs: dict, stages: list, rows_by_key: dict) -> str:
    """Wall time of every stage kind and its throughput (training: median tokens/s over the steps; evaluation:
    documents per second of wall time, model loading included)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    lines = ["| stage | runs | wall time (total) | wall time (median per run) | throughput |", "|---|---|---|---|---|"]
    groups = defaultdict(list)
    for s in stages:
        if s.key in runs:
            groups[s.key if s.kind == "pretrain" else s.kind].append(s)
    for name, group in groups.items():
        walls = [w for w in (_wall_s(runs[s.key]) for s in group) if w is not None]
        if not walls:
            continue
        if group[0].kind == "evaluate":
            docs = sum(rows_by_key[s.key]["n"] or 0 for s in group if s.key in rows_by_key)
            rate = f"{docs / sum(walls):.2f} documents/s" if docs else "—"
        else:
            tps = [v for s in group for _, v in _history(client, runs[s.key], "perf/tokens_per_s")]
            rate = f"{statistics.median(tps):,.0f} tokens/s (median step)" if tps else "—"
        lines.append(f"| {name} | {len(walls)} | {sum(walls):,.0f} s | {statistics.median(walls):,.1f} s | {rate} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def ui_command(uri: str) -> str:
    """The `mlflow ui` command for this store, with a local store's path made absolute (it works from anywhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif "://" not in uri:
        uri = os.path.abspath(uri)
    return f"mlflow ui --backend-store-uri {uri}"


def build_report(recipe, *, parent_run_id: Optional[str] = None, log=print) -> str:
    """Write <output_dir>/report/ (report.md and its PNGs, pause_ratio.png with a ratio sweep) from MLflow; log
    them on the parent run.

    Raises ReportError when a planned evaluation has no score (see the module's docstring).
    """
    from pause_megatron.recipe import full_plan

    plan = full_plan(recipe)
    evals = [s for s in plan if s.kind == "evaluate"]
    rows = planned_rows(recipe.tracking, evals)
    runs = stage_runs(recipe.tracking, plan)
    out = os.path.join(recipe.output_dir, "report")
    os.makedirs(out, exist_ok=True)
    table, best, cells = main_table(rows, list(recipe.variants))
    parts = [f"# {recipe.name}: results", "",
             f"{len(rows)} evaluation runs from MLflow ({recipe.tracking.uri}, experiment "
             f"{recipe.tracking.experiment}). Browse them with", "", f"    {ui_command(recipe.tracking.uri)}", "",
             "Each cell: score in %, mean ± std over the seeds, then the 95% interval of that mean over the "
             "evaluation documents, and n = how many documents each seed was scored on. Intervals: Wilson for "
             "accuracy and exact match (0/1 per document), normal (mean ± 1.96 sd/√n) for F1. For PauseFT variants "
             "the better M_ft per task, chosen on the reported evaluation split itself (as the paper reports; not "
             "a held-out choice).", "", "## Variant × task", "", table]
    notes = overlap_notes(cells)
    if notes:
        parts += ["", *notes]
    mft = m_ft_table(rows)
    if mft:
        parts += ["", "## M_ft", "", mft, "", "![M_ft](m_ft.png)"]
    series = m_inf_series(rows, best)
    if series:
        parts += ["", "## M_inf robustness and '.' fillers", "", "| model | task | pauses (or fillers): score |",
                  "|---|---|---|"]
        parts += [f"| {v} | {t} | " + ", ".join(f"{mi}: {statistics.fmean(r['value'] for r in g):.1f}"
                                                 for mi, g in pts) + " |" for (v, t), pts in sorted(series.items())]
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
    pre = pretrain_curves(recipe.tracking, runs, plan)
    pre_png = plot_curves([(title, "loss", {pt: c[key] for pt, c in pre.items()}) for key, title in PRETRAIN_PANELS],
                          os.path.join(out, "pretrain_loss.png"))
    if pre_png:
        parts += ["", "## Pretraining loss (StdPT vs PausePT)", "",
                  "Losses on non-pause targets compare the two models on the same prediction task; the all-target "
                  "loss of PausePT also counts its (ignored at inference) predictions at pause positions.", "",
                  "![pretraining loss](pretrain_loss.png)"]
    ft = finetune_curves(recipe.tracking, runs, plan)
    ft_png = plot_curves([(f"{task}: finetuning loss (target tokens)", "training loss (mean over seeds)", lines)
                          for task, lines in sorted(ft.items())], os.path.join(out, "finetune_loss.png"))
    if ft_png:
        parts += ["", "## Finetuning loss", "", "![finetuning loss](finetune_loss.png)"]
    times = times_table(recipe.tracking, runs, plan, {s.key: r for s, r in zip(evals, rows)})
    if times:
        parts += ["", "## Stage wall times and throughput", "", times,
                  "", "(From each stage's MLflow run; the data stage has none. On a shared or busy machine these "
                  "times measure the machine as much as the code.)"]
    text = "\n".join(parts) + "\n"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text)
    plots = [plot_m_inf(series, os.path.join(out, "m_inf.png")), plot_m_ft(rows, os.path.join(out, "m_ft.png")),
             pre_png, ft_png, plot_ratio(ratios, os.path.join(out, "pause_ratio.png"))]
    if parent_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=recipe.tracking.uri)
        for path in [os.path.join(out, "report.md"), *[p for p in plots if p]]:
            client.log_artifact(parent_run_id, path, "report")
    log(text)
    return text
