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
    from pause_megatron.tasks import get_task, load_examples, overlapping_prompts

    task = get_task(name)
    train = load_examples(task, part="train", data_dir=SAMPLE_TASKS)
    evaluation = load_examples(task, part="eval", data_dir=SAMPLE_TASKS)
    eval_rows = (ROOT / SAMPLE_TASKS / name / "eval.jsonl").read_text().splitlines()
    train_rows = {json.dumps(json.loads(r), sort_keys=True)
                  for r in (ROOT / SAMPLE_TASKS / name / "train.jsonl").read_text().splitlines()}
    assert len(eval_rows) >= MIN_EVAL_ROWS and len({p for p, _ in evaluation}) == len(evaluation)  # no repeats
    assert not [r for r in eval_rows if json.dumps(json.loads(r), sort_keys=True) in train_rows]
    # compared as the model sees them: the prompts (CoQA: every turn's prompt), up to case, spacing, word-end punctuation
    assert overlapping_prompts(train, evaluation) == 0


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


def _words(text: str) -> set[str]:
    return {w.strip(".,?!:;'\"").casefold() for w in text.split()} - {""}


def _mc_rows(name: str, part: str):
    """(context, choices, gold index) of each row of a multiple-choice task, as the model is shown them."""
    from pause_megatron.tasks import get_task

    rows = [json.loads(r) for r in (ROOT / SAMPLE_TASKS / name / f"{part}.jsonl").read_text().splitlines()]
    if name == "commonsense_qa":  # scored by generation, but the prompt lists the choices
        return [(r["question"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"])) for r in rows]
    cfg = get_task(name).lm_eval
    return [(cfg["doc_to_text"](r), cfg["doc_to_choice"](r), cfg["doc_to_target"](r)) for r in rows]


def _first_best(choices, score):
    scores = [score(c) for c in choices]
    return scores.index(max(scores))


HEURISTICS = {  # each picks a choice from its surface alone; ties go to the first choice
    "longest": lambda ctx, ch: _first_best(ch, len),
    "shortest": lambda ctx, ch: _first_best(ch, lambda c: -len(c)),
    "first": lambda ctx, ch: 0,
    "last": lambda ctx, ch: len(ch) - 1,
    "names a context name": lambda ctx, ch: _first_best(
        ch, lambda c: len({w for w in ctx.split()[1:] if w[:1].isupper()} & set(c.replace(".", " ").split()))),
    "most words shared with the context": lambda ctx, ch: _first_best(ch, lambda c: len(_words(c) & _words(ctx))),
    "fewest words shared with the context": lambda ctx, ch: _first_best(ch, lambda c: -len(_words(c) & _words(ctx))),
}


@pytest.mark.parametrize("part", ["train", "eval"])
@pytest.mark.parametrize("name", ["hellaswag", "piqa", "commonsense_qa"])
def test_no_surface_heuristic_finds_the_answer(name, part):
    rows = _mc_rows(name, part)
    for heuristic, pick in HEURISTICS.items():
        right = sum(pick(ctx, choices) == gold for ctx, choices, gold in rows)
        assert right <= 0.6 * len(rows), f"{name} {part}: '{heuristic}' picks the answer in {right}/{len(rows)} rows"


def test_hellaswag_endings_of_train_and_eval_are_disjoint():
    endings = {part: {e.split(" ", 1)[1] for _, choices, _ in _mc_rows("hellaswag", part) for e in choices}
               for part in ("train", "eval")}
    assert endings["train"] and not endings["train"] & endings["eval"]


def test_lambada_eval_templates_are_not_train_templates_and_vary():
    import re

    def template(text):  # the passage with its names, objects and places (capitalised or repeated words) masked
        words = text.split()
        return " ".join("_" if w[:1].isupper() or words.count(w) > 1 else w for w in words)

    rows = {part: [json.loads(r)["text"] for r in (ROOT / SAMPLE_TASKS / "lambada" / f"{part}.jsonl").read_text()
                   .splitlines()] for part in ("train", "eval")}
    templates = {part: {re.sub(r"_( _)*", "_", template(t)) for t in texts} for part, texts in rows.items()}
    assert len(templates["eval"]) >= 5 and not templates["eval"] & templates["train"]


def test_gsm8k_eval_questions_are_not_train_questions_with_another_name():
    def masked(question):
        return " ".join("_" if w[:1].isupper() else w for w in question.split())

    train, evaluation = ({masked(json.loads(r)["question"])
                          for r in (ROOT / SAMPLE_TASKS / "gsm8k" / f"{p}.jsonl").read_text().splitlines()}
                         for p in ("train", "eval"))
    assert not train & evaluation


def test_generator_writes_the_committed_rows(tmp_path):
    from pause_megatron.sample_tasks import generate

    generate.main([str(tmp_path)])
    for name in TASK_NAMES:
        for part in ("train", "eval"):
            assert (tmp_path / name / f"{part}.jsonl").read_text() == \
                (ROOT / SAMPLE_TASKS / name / f"{part}.jsonl").read_text(), f"{name}/{part}"


def test_near_duplicate_prompts_count_as_overlap(tmp_path):
    """An eval row copied into train with its case, spacing and end punctuation changed is still an overlap."""
    from pause_megatron.tasks import get_task, load_examples, overlapping_prompts

    data = tmp_path / "tasks"
    shutil.copytree(ROOT / SAMPLE_TASKS / "piqa", data / "piqa")
    rows = [json.loads(r) for r in (data / "piqa" / "eval.jsonl").read_text().splitlines()[:2]]
    rows[0]["goal"] = rows[0]["goal"].upper().replace(" ", "   ")
    rows[1]["goal"] = "  " + rows[1]["goal"].rstrip("?.") + " ."
    with open(data / "piqa" / "train.jsonl", "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("piqa")
    train, evaluation = (load_examples(task, part=p, data_dir=str(data)) for p in ("train", "eval"))
    assert overlapping_prompts(train, evaluation) == 2
