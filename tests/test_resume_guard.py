"""Starting a job again on its own output (issue 18): a finished run saves nothing and its final checkpoint stays
as it was; a changed config continues only for a documented safe change (more steps), otherwise it is refused
with the reason and nothing is written; the tokenizer must be the one the checkpoint was made with."""

import json
import os
import shutil

import pytest

from helpers import python, torchrun

pytestmark = pytest.mark.slow

ARGS = ["model.preset=tiny", "train.global_batch_size=4", "train.micro_batch_size=2", "optim.warmup_steps=1",
        "train.eval_interval=0", "tracking.enabled=false"]


def pretrain(data, out, *extra, check=True):
    return torchrun("-m pause_megatron.pretrain", f"data.path={data}", f"train.output_dir={out}", *ARGS, *extra,
                    check=check)


@pytest.fixture(scope="module")
def finished(tiny_c4, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    pretrain(tiny_c4, out, "train.steps=2")
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def _stats(out) -> dict:
    """(inode, mtime) of every file of the final checkpoint, of `latest` and of the checkpoints' tokenizer."""
    ckpt = out / "checkpoints"
    paths = [ckpt / "latest", ckpt / "tokenizer.model", *sorted((ckpt / "iter_0000002").rglob("*"))]
    return {str(p): (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}


def test_a_finished_run_started_again_rewrites_nothing(finished, tiny_c4, tmp_path):
    run = _copy(finished, tmp_path)
    before = _stats(run)
    proc = pretrain(tiny_c4, run, "train.steps=2")
    assert "at step 2" in proc.stdout
    assert _stats(run) == before  # the final step was not saved again (nor deleted first), the tokenizer kept


def test_a_changed_lr_is_refused_and_nothing_is_written(finished, tiny_c4, tmp_path):
    run = _copy(finished, tmp_path)
    config = (run / "config.json").read_text()
    for change, named in (("optim.lr=5e-3", "optim.lr: 0.0003 -> 0.005"), ("train.steps=1", "train.steps")):
        proc = pretrain(tiny_c4, run, "train.steps=2", change, check=False)
        assert proc.returncode != 0 and named in proc.stderr, proc.stderr[-3000:]  # the ranks exit 2
    assert (run / "config.json").read_text() == config
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"


def test_more_steps_continue_on_the_schedule_of_the_new_total(finished, tiny_c4, tmp_path):
    run = _copy(finished, tmp_path)
    proc = pretrain(tiny_c4, run, "train.steps=4")
    assert "at step 2" in proc.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    lr = {r["step"]: r["train/lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    # Cosine from 3e-4 to 3e-5 over 4 steps (warmup 1): after step 3 the LR is still well above the minimum;
    # the 2-step schedule saved in the checkpoint would have ended at the minimum.
    assert lr[3] > 3.0e-5 * 1.5


def test_resuming_with_another_tokenizer_is_refused(finished, tiny_c4, tmp_path):
    other = tmp_path / "other"  # the same documents, prepared again with another vocabulary
    python("-m", "data_prep.build_c4", "build", "--input", str(tiny_c4.parent / "json"), "--output", str(other),
           "--seq-length", "128", "--vocab-size", "400", "--workers", "1")
    run = _copy(finished, tmp_path)
    tokenizer = (run / "checkpoints" / "tokenizer.model").read_bytes()
    proc = pretrain(other, run, "train.steps=3", check=False)
    assert proc.returncode != 0 and "tokenizer checksum" in proc.stderr, proc.stderr[-3000:]
    assert (run / "checkpoints" / "tokenizer.model").read_bytes() == tokenizer


def _losses(out) -> dict:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_distributed_optimizer_saves_and_resumes_like_an_uninterrupted_run(tiny_c4, tmp_path):
    """2 ranks of DP with optim.distributed=true: 2 steps, saved, resumed to 4 = 4 steps in one go. Switching
    optim.distributed on resume is refused (its optimizer state is another object). A constant LR, so that the
    2-step run's schedule is the 4-step run's (more steps re-stretch a decaying schedule)."""
    dist = ["optim.distributed=true", "train.global_batch_size=8", "optim.min_lr=3.0e-4", "optim.warmup_steps=0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={whole}", *ARGS, *dist,
             "train.steps=4", nproc=2)
    torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={split}", *ARGS, *dist,
             "train.steps=2", nproc=2)
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={split}", *ARGS,
                    *[a for a in dist if a != "optim.distributed=true"], "train.steps=4", nproc=2, check=False)
    assert proc.returncode != 0 and "optim.distributed: True -> False" in proc.stderr, proc.stderr[-3000:]
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={split}", *ARGS,
                    *dist, "train.steps=4", nproc=2)
    assert "at step 2" in proc.stdout
    a, b = _losses(whole), _losses(split)
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]  # bit for bit: the optimizer state was restored


def test_latest_naming_a_half_written_step_falls_back_to_the_newest_complete_one(finished, tiny_c4, tmp_path):
    """What older code could leave: `latest` names a step whose directory was deleted and partly rewritten."""
    run = _copy(finished, tmp_path)
    ckpt = run / "checkpoints"
    (ckpt / "iter_0000003").mkdir()
    (ckpt / "iter_0000003" / "common.pt").write_bytes(b"partial")
    (ckpt / "latest").write_text("iter_0000003\n")
    proc = pretrain(tiny_c4, run, "train.steps=3")
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-2000:]
    assert "iter_0000003, which is not a complete checkpoint" in proc.stderr
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    assert (ckpt / "iter_0000003" / "metadata.json").exists()
