"""The built-in task rows are held out (no evaluation prompt is a training prompt), and the entry points warn
when a task's evaluation prompts overlap its training prompts, for any task data."""

import json
import logging
import shutil

import pytest

from conftest import SAMPLE_TASKS
from helpers import ROOT, python

TASK_NAMES = ["gsm8k", "squad", "coqa", "commonsense_qa", "piqa", "hellaswag", "lambada", "webqs", "nq_open"]
MIN_EVAL_ROWS = 32  # a cell of the quickstart's report stands on this many documents per seed


@pytest.mark.parametrize("name", TASK_NAMES)
def test_built_in_eval_rows_are_held_out(name):
    from pause_megatron.tasks import get_task, load_examples

    task = get_task(name)
    train = load_examples(task, part="train", data_dir=SAMPLE_TASKS)
    evaluation = load_examples(task, part="eval", data_dir=SAMPLE_TASKS)
    eval_rows = (ROOT / SAMPLE_TASKS / name / "eval.jsonl").read_text().splitlines()
    train_rows = {json.dumps(json.loads(r), sort_keys=True)
                  for r in (ROOT / SAMPLE_TASKS / name / "train.jsonl").read_text().splitlines()}
    assert len(eval_rows) >= MIN_EVAL_ROWS
    assert not [r for r in eval_rows if json.dumps(json.loads(r), sort_keys=True) in train_rows]
    # compared as the model sees them: the prompts (CoQA: every turn's prompt)
    assert not {p for p, _ in evaluation} & {p for p, _ in train}


def _overlapping_copy(tmp_path, name="piqa", rows=3):
    data = tmp_path / "tasks"
    shutil.copytree(ROOT / SAMPLE_TASKS / name, data / name)
    evaluation = (data / name / "eval.jsonl").read_text().splitlines()
    with open(data / name / "train.jsonl", "a") as fh:
        fh.write("\n".join(evaluation[:rows]) + "\n")
    return data


def test_overlapping_prompts_are_counted_and_warned(tmp_path, caplog):
    from pause_megatron.tasks import get_task, load_examples, warn_if_overlapping

    data = _overlapping_copy(tmp_path)
    task = get_task("piqa")
    train, evaluation = (load_examples(task, part=p, data_dir=str(data)) for p in ("train", "eval"))
    with caplog.at_level(logging.WARNING):
        assert warn_if_overlapping(task, train, evaluation, where=str(data)) == 3
    assert "task piqa: 3 of 32 evaluation prompts also appear in its training rows" in caplog.text
    caplog.clear()
    held_out = [load_examples(task, part=p, data_dir=SAMPLE_TASKS) for p in ("train", "eval")]
    assert warn_if_overlapping(task, *held_out, where=SAMPLE_TASKS) == 0 and not caplog.text


def test_evaluate_entry_point_warns_about_overlap_before_loading_the_model(tmp_path):
    data = _overlapping_copy(tmp_path, "squad", rows=2)
    proc = python("-m", "pause_megatron.evaluate", "--checkpoint", str(tmp_path / "no-checkpoint"), "--tasks",
                  "squad", "--data-dir", str(data), "tracking.enabled=false", check=False)
    assert "task squad: 2 of 32 evaluation prompts also appear in its training rows" in proc.stderr
    assert proc.returncode == 2  # then the missing checkpoint


def test_finetune_datasets_warn_about_overlap(tmp_path, tiny_c4, caplog):
    from pause_megatron.config import load_config
    from pause_megatron.finetune import build_datasets
    from pause_megatron.tokenizer import PauseTokenizer

    data = _overlapping_copy(tmp_path, "lambada", rows=4)
    cfg = load_config("recipes/finetune.yaml", ["task=lambada", f"data.task_dir={data}", "model.seq_length=128",
                                                "pauses.m_ft=2"], hardware=False)
    with caplog.at_level(logging.WARNING):
        build_datasets(cfg, PauseTokenizer.load(str(tiny_c4 / "tokenizer.model")))
    assert "task lambada: 4 of 32 evaluation prompts also appear in its training rows" in caplog.text
