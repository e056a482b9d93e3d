"""Recipes: validation before anything runs, the paper plans, skip-and-resume, and the report from MLflow."""

import json
import os

import pytest

from helpers import ROOT, python

MICRO = {  # the quickstart cut down to 2 variants x 1 task x 1 seed, M_ft in {1, 2}: 10 stages
    "name": "micro", "variants": ["StdPT_StdFT", "PausePT_PauseFT"],
    "data": {"input": "sample", "sample_files": 1, "sample_docs_per_file": 150, "seq_length": 128,
             "vocab_size": 600},
    "pretrain": {"config": "recipes/pretrain_tiny.yaml",
                 "overrides": ["parallel.tensor=1", "train.steps=6", "train.eval_interval=0", "train.save_interval=0"]},
    "finetune": {"config": "recipes/finetune.yaml", "tasks": ["piqa"], "m_ft": [1, 2], "seeds": [0],
                 "task_dir": "pause_megatron/sample_tasks",
                 "overrides": ["train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=2",
                               "optim.warmup_steps=1", "train.eval_interval=0", "precision.dtype=fp32"]},
    "evaluate": {"limit": 2},
    "launch": {"executor": "local", "nproc": 1},
}


def write_recipe(tmp_path, **changes) -> str:
    import yaml

    recipe = json.loads(json.dumps(MICRO))
    recipe.update(output_dir=str(tmp_path / "out"), tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                               "experiment": "micro"})
    recipe["data"]["path"] = str(tmp_path / "out" / "data" / "c4")
    for key, value in changes.items():
        recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def cli(*args, check=True):
    return python("-m", "pause_megatron.cli", "recipe", *args, check=check, timeout=1800)


@pytest.mark.parametrize("change,named", [
    ({"stages": ["data", "pretrain", "distill"]}, "unknown stage 'distill'"),
    ({"variants": ["PausePT_PauseFT", "PausePT_MagicFT"]}, "unknown variant 'PausePT_MagicFT'"),
    ({"finetune": {**MICRO["finetune"], "tasks": ["piqa", "trivia"]}}, "unknown task 'trivia'"),
    ({"evaluate": {**MICRO["evaluate"], "batch_size": "0"}}, "evaluate.batch_size: batch size must be"),
])
def test_a_bad_recipe_fails_before_running_anything(tmp_path, change, named):
    proc = cli("run", write_recipe(tmp_path, **change), check=False)
    assert proc.returncode == 2 and named in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["paper_1b", "paper_130m", "ablations_1b"])
def test_paper_recipes_resolve_without_a_gpu(recipe):
    out = cli("run", f"recipes/{recipe}.yaml", "--dry-run").stdout
    for variant in ("StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT"):
        assert variant in out
    assert "pretrain/pause" in out and "finetune/PausePT/squad/append50/seed4" in out
    assert "GPU-hours (estimated, not measured on a GPU)" in out and "of checkpoints kept" in out
    if recipe == "ablations_1b":
        assert "evaluate/PausePT/squad/append10/seed0/append0" in out  # M_inf robustness
        assert "finetune/PausePT/squad/prepend10/seed0" in out
        assert "evaluate/StdPT/squad/none0/seed0/filler50" in out


# The micro recipe with one M_ft: 7 stages and the report, run twice below. The M_ft section that two M_ft give is
# checked from MLflow runs in test_recipe_reuse.py (test_report_compares_prepending_with_appending_at_the_same_m_ft).
ONE_M_FT = {"finetune": {**MICRO["finetune"], "m_ft": [1]}}


@pytest.mark.slow
def test_interrupted_recipe_skips_finished_stages_and_ends_with_the_same_report(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    cli("run", write_recipe(whole, **ONE_M_FT))
    report = (whole / "out" / "report" / "report.md").read_text()
    assert "| piqa | acc |" in report and "PausePT_PauseFT" in report and "StdPT_StdFT" in report
    assert "(n=2, 1 seed)" in report  # evaluate.limit rows behind each cell, with its 95% interval
    assert "## Pretraining loss" in report and (whole / "out" / "report" / "pretrain_loss.png").exists()
    assert "## Stage wall times" in report and "mlflow ui --backend-store-uri sqlite:///" in report

    parts = tmp_path / "parts"
    parts.mkdir()
    recipe = write_recipe(parts, **ONE_M_FT)
    first = cli("run", recipe, "stages=[data,pretrain]").stdout  # stopped between stages
    assert "run  pretrain/std" in first and "run  pretrain/pause" in first and "finetune" not in first
    marker = parts / "out" / "pretrain" / "pause" / "stage.json"
    stamp = os.stat(marker).st_mtime_ns
    second = cli("run", recipe).stdout
    assert "skip data (done)" in second and "skip pretrain/pause (done)" in second
    assert "run  finetune/PausePT/piqa/append1/seed0" in second and "run  finetune/StdPT/piqa/none0/seed0" in second
    assert os.stat(marker).st_mtime_ns == stamp
    resumed = (parts / "out" / "report" / "report.md").read_text()
    assert scores(resumed) == scores(report)

    # The report again, from the MLflow store alone (stage outputs deleted).
    for stage in ("finetune", "evaluate"):
        import shutil

        shutil.rmtree(parts / "out" / stage)
    (parts / "out" / "report" / "report.md").unlink()
    cli("report", recipe)
    assert scores((parts / "out" / "report" / "report.md").read_text()) == scores(report)


def scores(report: str) -> str:
    """The report's score sections: without the header naming the store, and without the curves and stage
    times, which differ between two runs of the same stages."""
    return report.split("## Variant × task")[1].split("## Pretraining loss")[0]
