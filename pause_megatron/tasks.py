"""The paper's nine downstream tasks: data, the prompt/target format, and the metric the paper reports.

One prompt format per task serves both finetuning (prompt + M pauses + target, loss on the target) and
evaluation (the same prompt + M_inf pauses, scored by lm-eval's own metric code). Data comes from the
Hugging Face hub through `datasets`, or offline from `<data_dir>/<task>/<split>.jsonl` files in the dataset's
own row format (`<split>` is `train` or `eval`; which hub split each stands for is in the Task).
"""

from __future__ import annotations

import logging
import os
import string
from dataclasses import dataclass, field
from typing import Callable, Optional

EM_KWARGS = {"ignore_case": True, "ignore_punctuation": True,
             "regexes_to_ignore": [r"\b(?:The |the |An |A |a |an )"]}  # SQuAD-style answer normalisation
FIRST_LINE_STRIPPED = [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}]
GREEDY = {"do_sample": False, "temperature": 0.0}
# LAMBADA's answer is the first word of the output: apostrophes inside a word belong to it ("don't", "o'clock"),
# quotes and punctuation around it do not.
LAMBADA_WORD = r"([^\s.,!?;:\"'“”‘’]+(?:['’][^\s.,!?;:\"'“”‘’]+)*)"


class UnknownTask(KeyError):
    pass


class TaskDataError(ValueError):
    """A task's data file has a row that is not in the dataset's format; the message names file and row."""


@dataclass(frozen=True)
class Task:
    """One downstream task. `examples(doc)` gives finetuning (prompt, target) pairs; `lm_eval` its scoring."""

    name: str
    hf_path: str
    hf_name: Optional[str]
    train_split: str  # on the hub; offline: <data_dir>/<name>/train.jsonl
    eval_split: str  # on the hub; offline: <data_dir>/<name>/eval.jsonl
    metric: str  # the lm-eval metric that is the paper's figure (GSM8K "accuracy" is exact_match of the number)
    examples: Callable[[dict], list[tuple[str, str]]]
    lm_eval: dict = field(default_factory=dict)  # lm-eval task config, without the dataset fields
    eval_docs: int = 0  # documents in the hub's eval split (the dry-run's evaluation hours; offline: the file's rows)

    def local_file(self, data_dir: str, part: str) -> str:
        return os.path.join(data_dir, self.name, f"{part}.jsonl")


# ---- prompt formats --------------------------------------------------------------------------------------

def _gsm8k_prompt(doc):
    return f"Question: {doc['question']}\nAnswer:"


def _squad_prompt(doc):
    return f"Title: {doc['title']}\n\nBackground: {doc['context']}\n\nQuestion: {doc['question']}\n\nAnswer:"


def _coqa_turn(doc, turn: int) -> dict:
    """The doc cut after `turn` questions, so that lm-eval's CoQA prompt asks question `turn`."""
    return {**doc, "questions": {"input_text": doc["questions"]["input_text"][: turn + 1]},
            "answers": {"input_text": doc["answers"]["input_text"][: turn + 1]}}


def _coqa_examples(doc):
    from lm_eval.tasks.coqa import utils as coqa

    return [(coqa.doc_to_text(_coqa_turn(doc, i)), " " + a) for i, a in enumerate(doc["answers"]["input_text"])]


def _csqa_prompt(doc):
    choices = "".join(f"{label}. {text}\n" for label, text in zip(doc["choices"]["label"], doc["choices"]["text"]))
    return f"Question: {doc['question']}\nChoices:\n{choices}Answer:"


def _csqa_answer(doc):
    return doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]


def _piqa_prompt(doc):
    return f"Question: {doc['goal']}\nAnswer:"


def _hellaswag_prompt(doc):
    from lm_eval.tasks.hellaswag.utils import preprocess

    return preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def _hellaswag_choices(doc):
    from lm_eval.tasks.hellaswag.utils import preprocess

    return [preprocess(e) for e in doc["endings"]]


def _lambada_prompt(doc):
    return " ".join(doc["text"].split(" ")[:-1])


def _lambada_word(doc):
    return doc["text"].split(" ")[-1]


def _webqs_prompt(doc):
    return f"Question: {doc['question']}\nAnswer:"


def _nq_prompt(doc):
    return f"Q: {doc['question']}?\nA:"


def _generate(until: list[str], max_gen_toks: int, **extra) -> dict:
    return {"output_type": "generate_until", "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks,
                                                                   **GREEDY}, **extra}


def _choice(doc_to_text, doc_to_choice, doc_to_target) -> dict:
    return {"output_type": "multiple_choice", "doc_to_text": doc_to_text, "doc_to_choice": doc_to_choice,
            "doc_to_target": doc_to_target, "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                             "higher_is_better": True}]}


def _em(**kwargs) -> list[dict]:
    return [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, **kwargs}]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("gsm8k", "openai/gsm8k", "main", "train", "test", "exact_match",
             examples=lambda d: [(_gsm8k_prompt(d), " " + d["answer"])],
             lm_eval=_generate(["Question:", "\n\n"], 256, doc_to_text=_gsm8k_prompt,
                               doc_to_target=lambda d: d["answer"].split("####")[-1].strip(),
                               filter_list=[{"name": "strict-match", "filter": [
                                   {"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"},
                                   {"function": "take_first"}]}],
                               metric_list=_em(ignore_case=True, regexes_to_ignore=[",", r"\$", r"\.$"])),
             eval_docs=1319),
        Task("squad", "rajpurkar/squad", None, "train", "validation", "exact_match",
             examples=lambda d: [(_squad_prompt(d), " " + d["answers"]["text"][0])],
             lm_eval=_generate(["\n"], 32, doc_to_text=_squad_prompt,
                               doc_to_target=lambda d: list(dict.fromkeys(d["answers"]["text"])),
                               filter_list=FIRST_LINE_STRIPPED, metric_list=_em(**EM_KWARGS)), eval_docs=10570),
        Task("coqa", "EleutherAI/coqa", None, "train", "validation", "f1",
             examples=_coqa_examples,
             lm_eval=_generate(["\nQ:", "\n"], 32, doc_to_text="__coqa__", doc_to_target="__coqa__",
                               process_results="__coqa__",
                               metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                            for m in ("em", "f1")]), eval_docs=500),
        Task("commonsense_qa", "tau/commonsense_qa", None, "train", "validation", "exact_match",
             examples=lambda d: [(_csqa_prompt(d), " " + _csqa_answer(d))],
             lm_eval=_generate(["\n"], 16, doc_to_text=_csqa_prompt, doc_to_target=_csqa_answer,
                               filter_list=FIRST_LINE_STRIPPED, metric_list=_em(**EM_KWARGS)), eval_docs=1221),
        Task("piqa", "baber/piqa", None, "train", "validation", "acc",
             examples=lambda d: [(_piqa_prompt(d), " " + [d["sol1"], d["sol2"]][int(d["label"])])],
             lm_eval=_choice(_piqa_prompt, lambda d: [d["sol1"], d["sol2"]], lambda d: int(d["label"])),
             eval_docs=1838),
        Task("hellaswag", "Rowan/hellaswag", None, "train", "validation", "acc",
             examples=lambda d: [(_hellaswag_prompt(d), " " + _hellaswag_choices(d)[int(d["label"])])],
             lm_eval=_choice(_hellaswag_prompt, _hellaswag_choices, lambda d: int(d["label"])), eval_docs=10042),
        # LAMBADA ships a test split only: on the hub we finetune on its first 80% and evaluate on the rest.
        Task("lambada", "EleutherAI/lambada_openai", "default", "test[:80%]", "test[80%:]", "exact_match",
             examples=lambda d: [(_lambada_prompt(d), " " + _lambada_word(d))],
             lm_eval=_generate(["\n"], 8, doc_to_text=_lambada_prompt, doc_to_target=_lambada_word,
                               filter_list=[{"name": "first-word", "filter": [
                                   {"function": "regex", "regex_pattern": LAMBADA_WORD},
                                   {"function": "take_first"}]}],
                               metric_list=_em(ignore_case=True)), eval_docs=1031),
        Task("webqs", "stanfordnlp/web_questions", None, "train", "test", "exact_match",
             examples=lambda d: [(_webqs_prompt(d), " " + d["answers"][0])],
             lm_eval=_generate(["\n"], 16, doc_to_text=_webqs_prompt, doc_to_target=lambda d: list(d["answers"]),
                               filter_list=FIRST_LINE_STRIPPED, metric_list=_em(**EM_KWARGS)), eval_docs=2032),
        Task("nq_open", "google-research-datasets/nq_open", None, "train", "validation", "exact_match",
             examples=lambda d: [(_nq_prompt(d), " " + d["answer"][0])],
             lm_eval=_generate(["\n", ".", ","], 16, doc_to_text=_nq_prompt, doc_to_target=lambda d: list(d["answer"]),
                               filter_list=FIRST_LINE_STRIPPED, metric_list=_em(**EM_KWARGS)), eval_docs=3610),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; the paper's tasks are {sorted(TASKS)}")
    return TASKS[name]


def load_split(task: Task, *, part: str, data_dir: Optional[str]):
    """A `datasets.Dataset` of the task's `part` ("train" or "eval"): local jsonl offline, else the hub."""
    import datasets

    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train' or 'eval', got {part!r}")
    if data_dir:
        path = task.local_file(data_dir, part)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found (task {task.name}, --data-dir {data_dir})")
        return datasets.load_dataset("json", data_files={"rows": path}, split="rows")
    return datasets.load_dataset(task.hf_path, task.hf_name,
                                 split=task.train_split if part == "train" else task.eval_split)


class _StrictRow(dict):
    """A data row that treats a None field as missing: `datasets` fills absent JSON keys with None."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if value is None:
            raise KeyError(key)
        return _StrictRow(value) if isinstance(value, dict) else value


def load_examples(task: Task, *, part: str, data_dir: Optional[str]) -> list[tuple[str, str]]:
    """All (prompt, target) pairs of a split; a row missing a field is an error naming the file and row."""
    rows = load_split(task, part=part, data_dir=data_dir)
    pairs = []
    for i, doc in enumerate(rows):
        try:
            pairs.extend(task.examples(_StrictRow(doc)))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            where = task.local_file(data_dir, part) if data_dir else f"{task.hf_path} ({part})"
            what = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise TaskDataError(f"{where}: row {i + 1} is not in {task.name}'s format ({what})") from None
    if not pairs:
        raise TaskDataError(f"{task.name} ({part}): no examples")
    return pairs


def _normalised(prompt: str) -> str:
    """A prompt compared as near-duplicates are: case folded, runs of whitespace as one space, punctuation at
    the ends of each word dropped ("What is X?" and "what is  x ." are the same question to a model that has
    seen one; a prompt template puts the question's own end mid-prompt)."""
    return " ".join(w for w in (w.strip(string.punctuation) for w in prompt.casefold().split()) if w)


def overlapping_prompts(train: list[tuple[str, str]], evaluation: list[tuple[str, str]]) -> int:
    """How many distinct evaluation prompts are also training prompts, up to case, spacing and punctuation at word ends
    (a score on those measures recall)."""
    return len({_normalised(p) for p, _ in evaluation} & {_normalised(p) for p, _ in train})


def warn_if_overlapping(task: Task, train: list[tuple[str, str]], evaluation: list[tuple[str, str]], *,
                        where: str) -> int:
    """Log a warning naming the task and the count when eval prompts also appear in the train rows."""
    n = overlapping_prompts(train, evaluation)
    if n:
        logging.getLogger(__name__).warning(
            "task %s: %d of %d evaluation prompts also appear in its training rows (%s; up to case, spacing and "
            "punctuation at word ends); scores on them measure memorisation, not generalisation",
            task.name, n, len({_normalised(p) for p, _ in evaluation}), where)
    return n


def lm_eval_config(task: Task, *, data_dir: Optional[str]) -> dict:
    """The lm-eval task config (a dict: simple_evaluate takes it as it takes a YAML) for the eval split."""
    cfg = {"task": f"pause_{task.name}", **task.lm_eval}
    if task.name == "coqa":  # lm-eval's own CoQA prompt, answers and em/f1 scorer
        from lm_eval.tasks.coqa import utils as coqa

        cfg.update(doc_to_text=coqa.doc_to_text, doc_to_target=coqa.doc_to_target,
                   process_results=coqa.process_results)
    if data_dir:
        path = task.local_file(data_dir, "eval")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found (task {task.name}, --data-dir {data_dir})")
        cfg.update(dataset_path="json", dataset_kwargs={"data_files": {"eval": path}}, test_split="eval")
    else:
        cfg.update(dataset_path=task.hf_path, dataset_name=task.hf_name, test_split=task.eval_split)
    return cfg
