"""Per-task pause finetuning and lm-eval evaluation on the nine tasks' local rows (tiny model, CPU)."""

import json
import shutil

import pytest

from helpers import ROOT, python, torchrun

pytestmark = pytest.mark.slow

SAMPLES = str(ROOT / "pause_megatron" / "sample_tasks")
M_FT = 4
LOGIT_ATOL = 1e-4  # cached vs recomputed decoding (see the KV-cache test)
PAPER_METRIC = {"gsm8k": "exact_match", "squad": "exact_match", "coqa": "f1", "commonsense_qa": "exact_match",
                "piqa": "acc", "hellaswag": "acc", "lambada": "exact_match", "webqs": "exact_match",
                "nq_open": "exact_match"}
FT = ["train.steps=3", "optim.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
      "tracking.enabled=false", f"data.task_dir={SAMPLES}"]


def finetune(pretrained, out, task, *extra, nproc=1, check=True):
    return torchrun("-m pause_megatron.finetune", f"task={task}", f"train.init_from={pretrained}",
                    f"train.output_dir={out}", f"pauses.m_ft={M_FT}", *FT, *extra, nproc=nproc, check=check)


def evaluate(checkpoint, tasks, *extra, check=True, limit=2):
    proc = python("-m", "pause_megatron.evaluate", "--checkpoint", str(checkpoint), "--tasks", tasks,
                  "--data-dir", SAMPLES, "--limit", str(limit), "tracking.enabled=false", *extra, check=check)
    if not check:
        return proc
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"checkpoint"')][-1])


@pytest.fixture(scope="module")
def tasks_run(pretrained, tmp_path_factory):
    """Each of the nine tasks finetuned from `pretrained` (M_ft pauses, FT) and evaluated on its first 2 rows.

    The finetuning and evaluation commands' own `main`s, called in turn in one process (tests/dist/
    finetune_eval_tasks.py): the same work as `finetune` and `evaluate` below with one start-up instead of 27.
    The command lines themselves (torchrun, exit codes, stdout) are run by the other tests of this file.
    """
    out = tmp_path_factory.mktemp("tasks")
    proc = python(str(ROOT / "tests" / "dist" / "finetune_eval_tasks.py"), "--pretrained", str(pretrained), "--out",
                  str(out), "--tasks", ",".join(sorted(PAPER_METRIC)), "--data-dir", SAMPLES, "--limit", "2",
                  f"pauses.m_ft={M_FT}", *FT, timeout=1800)
    results = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("TASK ")]
    return out, {r["task"]: r for r in results}


@pytest.mark.parametrize("task", sorted(PAPER_METRIC))
def test_task_finetunes_then_evaluates_with_the_papers_metric(tasks_run, task):
    out, results = tasks_run
    result = results[task]
    assert result["error"] is None, result["error"]
    assert result["finetune"] == 0 and result["evaluate"] == 0, result
    report = json.loads((out / task / "eval.json").read_text())
    score = report["scores"][task][PAPER_METRIC[task]]
    assert 0.0 <= score <= 1.0 and report["m_inf"] == M_FT


def test_finetuning_on_two_ranks_with_tensor_parallelism(pretrained, tmp_path):
    proc = finetune(pretrained, tmp_path, "squad", "parallel.tensor=2", nproc=2)
    assert "TP=2" in proc.stdout
    assert json.loads([l for l in proc.stdout.splitlines() if l.startswith('{"final_step"')][-1])["final_step"] == 3


@pytest.fixture(scope="module")
def probe(pretrained):
    proc = python(str(ROOT / "tests" / "dist" / "eval_probe.py"), "--checkpoint", str(pretrained),
                  "--data-dir", SAMPLES)
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("PROBE ")][-1][6:])


def test_adapter_likelihood_equals_a_direct_forward_pass_with_pauses(probe):
    ll = probe["loglikelihood"]
    assert ll["adapter"] == pytest.approx(ll["direct"], rel=1e-5)


def test_kv_cached_generation_equals_recomputation_token_for_token(probe):
    """Same tokens, and at every step the same logits up to float32 summation order.

    The tokens alone cannot catch a cached token at the wrong RoPE position: the tiny model's greedy output
    depends almost only on the last token. The logits do; the tolerance: cached and recomputed decoding do the
    same float32 arithmetic in differently shaped matmuls, which moves logits of scale ~1 by ~1e-6, while a
    position off by one moved them by 4.2e-3 with the tokens unchanged (measured; ~40x the tolerance,
    docs/testing.md). This model uses RoPE; test_compat covers learned absolute positions.
    """
    for g in probe["generation"]:
        assert len(g["cached"]) == 40
        assert g["cached"] == g["recomputed"]
        assert g["max_logit_diff"] < LOGIT_ATOL, g["max_logit_diff"]


def test_finetuning_loss_ignores_prompt_and_pause_labels(probe):
    f = probe["finetune_loss"]
    assert f["prompt_label_changed"] == f["original"]
    assert f["pause_label_changed"] == f["original"]
    assert f["target_label_changed"] != pytest.approx(f["original"], rel=1e-6)
    assert f["pause_position"] < min(f["target_positions"])  # the pauses sit between prompt and target


@pytest.fixture(scope="module")
def finetuned(tasks_run):
    """The piqa finetuning checkpoint of `tasks_run` (global batch 4, micro batch 2)."""
    out, results = tasks_run
    assert results["piqa"]["finetune"] == 0, results["piqa"]
    return out / "piqa" / "checkpoints"


def test_data_parallel_evaluation_gives_the_single_process_results_per_request(finetuned, tmp_path):
    """Three ranks split lm-eval's requests (likelihood and generation) and gather them on rank 0.

    Compared per request (log-likelihoods and generated texts), not by score: the scores of the tiny model are
    saturated, so rank 1 returning rank 0's results or evaluating without pauses would not move them. Three
    ranks also split the 4 documents unevenly, and the checkpoint's global batch 4 / micro batch 2 would not
    divide over them: evaluation must not inherit that training check. The ranks score in batches of 3, the
    single process one request at a time: log-likelihoods agree to float32 rounding of other matmul shapes
    (~1e-6 relative, test_batched_eval.py). Planted defects: docs/testing.md.
    """
    tasks = ["--tasks", "piqa,nq_open", "--data-dir", SAMPLES, "--limit", "4", "tracking.enabled=false"]
    python("-m", "pause_megatron.evaluate", "--checkpoint", str(finetuned), *tasks, "--output",
           str(tmp_path / "single.json"))
    proc = torchrun("-m pause_megatron.evaluate", "--checkpoint", str(finetuned), *tasks, "--batch-size", "3",
                    "--output", str(tmp_path / "dp.json"), nproc=3)
    assert len([line for line in proc.stdout.splitlines() if line.startswith('{"checkpoint"')]) == 1  # rank 0
    single, dp = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("single", "dp"))
    assert dp["scores"] == single["scores"]
    for task in ("piqa", "nq_open"):
        want = {r["doc_id"]: r for r in single["samples"][task]}
        got = {r["doc_id"]: r for r in dp["samples"][task]}
        assert len(dp["samples"][task]) == len(want) == 4 and got.keys() == want.keys()
        for doc_id, w in want.items():
            assert got[doc_id]["arguments"] == w["arguments"]
            if task == "piqa":  # [log-likelihood, is greedy] per choice
                for g_resp, w_resp in zip(got[doc_id]["resps"], w["resps"], strict=True):
                    assert g_resp[0] == pytest.approx(w_resp[0], rel=1e-5) and g_resp[1] == w_resp[1]
            else:
                assert got[doc_id]["resps"] == w["resps"]  # the generated texts


def eval_prompts(checkpoint, m_inf: list[int], *overrides) -> list[dict]:
    """One evaluation per M_inf, in one process (tests/dist/eval_prompts.py loads the checkpoint for each)."""
    proc = python(str(ROOT / "tests" / "dist" / "eval_prompts.py"), "--checkpoint", str(checkpoint), "--tasks",
                  "nq_open", "--data-dir", SAMPLES, "--limit", "2", "--m-inf", ",".join(map(str, m_inf)),
                  "tracking.enabled=false", *overrides)
    return [json.loads(l[8:]) for l in proc.stdout.splitlines() if l.startswith("PROMPTS ")]


def test_m_inf_robustness_sweep_puts_m_inf_pauses_in_the_prompts_the_model_receives(finetuned):
    """Counted at the model's input, so evaluating with M_ft whatever pauses.m_inf says fails (docs/testing.md)."""
    sweep = (0, M_FT // 2, M_FT + 3)
    results = eval_prompts(finetuned, list(sweep))
    assert len(results) == len(sweep)
    for m, got in zip(sweep, results):
        assert got["m_inf"] == m and "exact_match" in got["scores"]["nq_open"]
        assert got["trailing_pauses"] == [m, m]  # two nq_open documents, one greedy generation each


def test_unknown_task_is_refused_before_training(pretrained, tmp_path):
    proc = finetune(pretrained, tmp_path, "trivia", check=False)  # under torchrun: any non-zero exit
    assert proc.returncode != 0 and "unknown task 'trivia'" in proc.stderr
    proc = evaluate(pretrained, "squad,trivia", check=False)
    assert proc.returncode == 2 and "unknown task 'trivia'" in proc.stderr
    proc = evaluate(pretrained, "squad", "--batch-size", "0", check=False)
    assert proc.returncode == 2 and "--batch-size: batch size must be a positive integer or 'auto'" in proc.stderr


def test_a_row_missing_a_field_names_file_and_row(pretrained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    rows = (data / "squad" / "train.jsonl").read_text().splitlines()
    bad = json.loads(rows[2])
    del bad["question"]
    rows[2] = json.dumps(bad)
    (data / "squad" / "train.jsonl").write_text("\n".join(rows) + "\n")
    proc = finetune(pretrained, tmp_path / "out", "squad", f"data.task_dir={data}", check=False)
    assert proc.returncode != 0
    assert "squad/train.jsonl: row 3 is not in squad's format" in proc.stderr and "question" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_checkpoint_whose_tokenizer_lacks_pause_is_refused(pretrained, tmp_path, corpus_texts):
    import io

    import sentencepiece as spm

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pretrained, ckpt)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_texts), model_writer=model, vocab_size=300,
                                   hard_vocab_limit=False, minloglevel=2)
    (ckpt / "tokenizer.model").write_bytes(model.getvalue())
    proc = finetune(ckpt, tmp_path / "out", "squad", check=False)
    assert proc.returncode != 0 and "has no <pause> piece" in proc.stderr
    proc = evaluate(ckpt, "squad", check=False)
    assert proc.returncode != 0 and "has no <pause> piece" in proc.stderr
