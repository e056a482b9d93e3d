"""Pretraining end to end on shards made by data prep: loss, layouts, resume, resharding, MLflow, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, subprocess_env, torchrun

pytestmark = pytest.mark.slow

BASE = ["model.preset=tiny", "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=2",
        "train.eval_steps=2", "tracking.enabled=false"]
RTOL = 1e-5  # see test_parallel.py: only the summation order differs between layouts


def pretrain(data, out, *overrides, nproc=1, check=True):
    return torchrun("-m pause_megatron.pretrain", f"data.path={data}", f"train.output_dir={out}", *BASE,
                    *overrides, nproc=nproc, check=check)


def metrics(out) -> dict[int, dict]:
    """Last record per step (a resumed run appends the steps it redid)."""
    rows = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r
    return rows


def test_loss_falls_and_validation_reports_pause_and_all_tokens(tiny_c4, tmp_path):
    pretrain(tiny_c4, tmp_path, "train.steps=30", "train.eval_interval=10", "optim.lr=2e-3")
    m = metrics(tmp_path)
    assert m[30]["train/loss"] < m[1]["train/loss"] - 1.0
    assert m[30]["val/loss"] < m[10]["val/loss"]
    # Pause variant: the all-token loss includes the pause targets, so it differs from the non-pause loss.
    assert m[30]["val/all_token_loss"] != pytest.approx(m[30]["val/loss"], rel=1e-3)
    assert m[30]["train/loss_tokens"] < 8 * 128  # pause targets are not counted
    assert {"perf/tokens_per_s", "perf/tflops_per_gpu", "perf/memory_gb", "train/grad_norm", "train/lr"} <= set(m[30])


def test_std_variant_has_no_pause_targets(tiny_c4, tmp_path):
    pretrain(tiny_c4, tmp_path, "train.steps=3", "train.eval_interval=3", "data.variant=std")
    m = metrics(tmp_path)
    assert m[3]["val/all_token_loss"] == pytest.approx(m[3]["val/loss"], rel=1e-9)


@pytest.fixture(scope="module")
def warm_start(tiny_c4, tmp_path_factory):
    """A 3-step checkpoint that every layout below starts from (same weights whatever the layout)."""
    out = tmp_path_factory.mktemp("warm")
    pretrain(tiny_c4, out, "train.steps=3")
    return out / "checkpoints"


def test_tp2xpp2_reproduces_the_single_process_curve(tiny_c4, tmp_path, warm_start):
    curves = []
    for name, nproc, layout in (("single", 1, []), ("tp2xpp2", 4, ["parallel.tensor=2", "parallel.pipeline=2"])):
        pretrain(tiny_c4, tmp_path / name, "train.steps=5", f"train.init_from={warm_start}", *layout, nproc=nproc)
        curves.append([metrics(tmp_path / name)[s]["train/loss"] for s in range(1, 6)])
    assert curves[1] == pytest.approx(curves[0], rel=RTOL)


def _rank_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _start(data, out, *overrides, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "pause_megatron.pretrain", f"data.path={data}", f"train.output_dir={out}", *BASE, *overrides]
    return subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_checkpoint(out, step, proc, timeout=300):
    marker = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(marker) and open(marker).read().strip() == f"iter_{step:07d}":
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint of step {step} in {out}")


def test_sigkill_of_a_rank_then_restart_equals_an_uninterrupted_run(tiny_c4, tmp_path):
    """Dropout is on so that training draws random numbers: resuming without the saved RNG states changes the
    loss from step 5 on (planted in docs/testing.md), while a correct resume stays bit for bit."""
    args = ["train.steps=12", "train.save_interval=4", "parallel.pipeline=2", "model.hidden_dropout=0.1",
            "model.attention_dropout=0.1"]
    pretrain(tiny_c4, tmp_path / "whole", *args, nproc=2)
    proc = _start(tiny_c4, tmp_path / "killed", *args, nproc=2)
    _wait_for_checkpoint(tmp_path / "killed", 4, proc)
    os.kill(_rank_pids(proc.pid)[-1], signal.SIGKILL)  # one rank dies; torchrun takes the rest down
    assert proc.wait(timeout=120) != 0
    resumed = pretrain(tiny_c4, tmp_path / "killed", *args, nproc=2)
    assert "resumed from" in resumed.stdout
    whole, killed = metrics(tmp_path / "whole"), metrics(tmp_path / "killed")
    for step in range(5, 13):
        assert killed[step]["train/loss"] == whole[step]["train/loss"], f"step {step}"  # bit for bit


def test_sigusr1_saves_and_the_rerun_resumes(tiny_c4, tmp_path):
    """What Slurm's --signal does before a time limit: every rank gets the signal, saves, exits 75."""
    args = ["train.steps=400", "train.save_interval=2"]
    proc = _start(tiny_c4, tmp_path, *args, nproc=2)
    _wait_for_checkpoint(tmp_path, 2, proc)
    for pid in _rank_pids(proc.pid):
        os.kill(pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0  # EXIT_STOPPED (75) from the ranks: not finished, run again to resume
    assert "stopped by SIGUSR1" in out, out[-3000:]
    stopped_at = max(metrics(tmp_path))
    assert stopped_at < 400
    with open(tmp_path / "checkpoints" / "latest") as f:
        assert f.read().strip() == f"iter_{stopped_at:07d}"
    rerun = pretrain(tiny_c4, tmp_path, f"train.steps={stopped_at + 2}", "train.save_interval=2",
                     "train.keep_checkpoints=2", nproc=2)
    assert f"at step {stopped_at}" in rerun.stdout
    assert max(metrics(tmp_path)) == stopped_at + 2
    # retention (train.keep_checkpoints reaches fit's saves): the two newest of the run's saves are left
    kept = sorted((tmp_path / "checkpoints").glob("iter_*"))
    assert len(kept) == 2 and kept[-1].name == f"iter_{stopped_at + 2:07d}", kept


def test_a_stop_signal_during_start_up_is_kept_and_honoured_after_the_first_step(tiny_c4, tmp_path):
    """Slurm's warning can come while the job still imports torch and Megatron: it must not kill the process
    with nothing saved. A lone rank gets SIGUSR1 0.5 s after it started."""
    cmd = [sys.executable, "-m", "pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={tmp_path}",
           *BASE, "train.steps=400"]
    stop = tmp_path / "stop"  # what slurm/common.sh run_step reads to requeue the job
    proc = subprocess.Popen(cmd, env={**subprocess_env(), "PAUSE_STOP_FILE": str(stop)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "stopped by SIGUSR1 at step 1" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    assert stop.read_text() == "1"


def test_checkpoint_saved_at_tp2_gives_the_same_loss_at_tp1(tiny_c4, tmp_path):
    """The reloaded model (TP=2 and TP=1) gives the validation loss the trained TP=2 model had in memory.

    Comparing TP=2 with TP=1 alone cannot catch a load that loads no weights: on the CPU a fresh model is the
    same at any TP (the whole weight comes from one seed, then is split). So the loss must also differ from a
    fresh model's: step 1 runs at learning rate 0 (linear warmup from 0), so its validation loss is the
    fresh model's. Planted defect and failure: docs/testing.md.
    """
    pretrain(tiny_c4, tmp_path, "train.steps=4", "train.eval_interval=1", "parallel.tensor=2", nproc=2)
    trained = metrics(tmp_path)
    losses = []
    for nproc, tp in ((2, 2), (1, 1)):
        proc = torchrun("-m pause_megatron.pretrain", "--validate-only", f"data.path={tiny_c4}",
                        f"train.output_dir={tmp_path}", *BASE, "train.steps=4", f"parallel.tensor={tp}", nproc=nproc)
        losses.append(json.loads([l for l in proc.stdout.splitlines() if l.startswith('{"step"')][-1]))
    assert losses[0]["step"] == losses[1]["step"] == 4
    assert losses[1]["val/loss"] == pytest.approx(losses[0]["val/loss"], rel=RTOL)
    assert losses[1]["val/loss"] == pytest.approx(trained[4]["val/loss"], rel=RTOL)
    fresh = trained[1]["val/loss"]
    assert losses[1]["val/loss"] != pytest.approx(fresh, rel=1e-3), "the checkpoint's weights were not loaded"


def test_mlflow_run_has_params_metrics_and_artifacts(tiny_c4, tmp_path):
    """Also, with Python's warnings shown as a user sees them (the test helpers otherwise silence them): the
    job states its kernels in one line and none of Megatron-Core's apex / Transformer Engine fallback warnings."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={tmp_path / 'run'}",
                    *[b for b in BASE if not b.startswith("tracking")], "train.steps=3", f"tracking.uri={uri}",
                    "tracking.experiment=t", nproc=2, PYTHONWARNINGS="default")
    output = proc.stdout + proc.stderr
    assert sum(line.startswith("kernels: ") for line in output.splitlines()) == 1  # rank 0 only
    assert "not installed" not in output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "tiny" and run.data.params["parallel.tensor"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "manifest.json"} <= names


def test_unreachable_tracking_server_does_not_stop_training(tiny_c4, tmp_path):
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={tmp_path}",
                    *[b for b in BASE if not b.startswith("tracking")], "train.steps=3",
                    "tracking.uri=http://127.0.0.1:9")  # nothing listens on port 9 here
    assert "MLflow (http://127.0.0.1:9)" in proc.stderr and "training continues" in proc.stderr
    assert max(metrics(tmp_path)) == 3


def test_missing_data_is_a_clear_error(tmp_path):
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={tmp_path}/nope", f"train.output_dir={tmp_path}/o",
                    *BASE, check=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "not found" in proc.stderr


def test_shards_of_another_tokenizer_are_refused(tiny_c4, tmp_path, corpus_texts):
    from pause_megatron.tokenizer import train_tokenizer

    other = tmp_path / "other.model"
    train_tokenizer(corpus_texts, vocab_size=400).save(str(other))
    proc = pretrain(tiny_c4, tmp_path / "o", f"data.tokenizer={other}", check=False)
    assert proc.returncode != 0
    assert "manifest.json: tokenizer checksum" in proc.stderr


def test_bad_config_fails_before_any_process_group(tmp_path):
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={tmp_path}", "parallel.tensor=3", check=False)
    assert proc.returncode != 0
    assert "model.num_attention_heads=4 is not divisible by parallel.tensor=3" in proc.stderr
