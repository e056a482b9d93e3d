"""The real sbatch launchers on a real two-node Slurm cluster (both slurmd on this machine, CPU, gloo).

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (`make test` installs them when run as root;
see tests/slurm/install.sh). Without them these tests are reported as skipped, with the reason.
"""

import json
import os
import shutil
import subprocess
import sys
import re
import time
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "tests" / "slurm" / "local_cluster.sh"
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + sorted((ROOT / "benchmarks").glob("*.sh"))
# The tiny model on 2 nodes x 2 CPU ranks: what replaces 8 GPUs per node in the test.
CPU_JOB = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (make test installs it as root)")
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS), str(CLUSTER)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("needs root and Debian's slurmctld/slurmd/munge (make test installs them as root)")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    yield env
    subprocess.run([str(CLUSTER), "stop", str(state)], check=False, timeout=60)


def submit(cluster, tmp_path, data, *overrides, wait=True, name="job"):
    env = dict(cluster, PAUSE_HOME=str(ROOT), PAUSE_PYTHON=sys.executable, PAUSE_CONFIG="recipes/pretrain_tiny.yaml",
               PAUSE_DATA=str(data), PAUSE_OUTPUT=str(tmp_path / "run"), PAUSE_MEGATRON_CPU="1",
               PAUSE_OVERRIDES=" ".join([f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides]))
    log = tmp_path / f"{name}.out"
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *CPU_JOB, f"--output={log}",
           str(ROOT / "slurm" / "pretrain_1b_pause.sh")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc, log


def latest(tmp_path) -> str:
    marker = tmp_path / "run" / "checkpoints" / "latest"
    return marker.read_text().strip() if marker.exists() else ""


def test_sbatch_trains_across_two_nodes_then_resumes(cluster, tiny_c4, tmp_path):
    proc, log = submit(cluster, tmp_path, tiny_c4, "train.steps=6", "train.save_interval=3", name="first")
    text = log.read_text()
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    assert "on 4 ranks (TP=2 PP=1 DP=2)" in text
    assert "ranks per node: n1: 2, n2: 2" in text
    assert latest(tmp_path) == "iter_0000006"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("pause-megatron-demo").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["parallel.tensor"] == "2"

    proc, log = submit(cluster, tmp_path, tiny_c4, "train.steps=9", "train.save_interval=3", name="second")
    text = log.read_text()
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    assert f"resumed from {tmp_path}/run/checkpoints/iter_0000006 at step 6" in text
    assert latest(tmp_path) == "iter_0000009"


def test_scancel_mid_run_then_resubmit_resumes(cluster, tiny_c4, tmp_path):
    proc, log = submit(cluster, tmp_path, tiny_c4, "train.steps=400", "train.save_interval=2",
                       "optim.warmup_steps=1", wait=False, name="cancelled")
    job = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0 and job, proc.stderr
    deadline = time.time() + 300
    while latest(tmp_path) < "iter_0000002":
        assert time.time() < deadline, log.read_text()[-4000:] if log.exists() else "no log"
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=cluster, check=True)
    while subprocess.run(["squeue", "-h", "-j", job], env=cluster, capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline
        time.sleep(0.5)
    stopped = latest(tmp_path)
    step = int(stopped.split("_")[1])
    assert step >= 2
    proc, log = submit(cluster, tmp_path, tiny_c4, f"train.steps={step + 2}", "train.save_interval=2",
                       "optim.warmup_steps=1", name="again")
    text = log.read_text()
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    assert f"resumed from {tmp_path}/run/checkpoints/{stopped} at step {step}" in text
    assert latest(tmp_path) == f"iter_{step + 2:07d}"


# ---- the recipe's Slurm executor on the real cluster (issue 19) ------------------------------------------------

def _recipe(tmp_path, data, *, pretrain, stages, variants, **launch) -> str:
    from test_recipe import MICRO, write_recipe

    return write_recipe(tmp_path, stages=stages, variants=variants, data={"path": str(data)},
                        pretrain={"config": "recipes/pretrain_tiny.yaml", **pretrain},
                        finetune={**MICRO["finetune"], "m_ft": [1]}, tracking={"enabled": False},
                        launch={"executor": "slurm", "gpus_per_node": 0, "nproc": 1, "cpus_per_task": 1,
                                "python": sys.executable, **launch})


def _run_recipe(path) -> list[str]:
    from pause_megatron.recipe import load_recipe, run

    lines = []
    assert run(load_recipe(path), recipe_path=path, log=lines.append) == 0, lines
    return lines


def _submitted(lines) -> list[str]:
    return sorted(line.split()[1].rstrip(":") for line in lines if line.startswith("submitted "))


def _wait_for_queue_to_empty(cluster, seconds=400) -> None:
    deadline = time.time() + seconds
    while subprocess.run(["squeue", "-h"], env=cluster, capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, subprocess.run(["squeue"], env=cluster, capture_output=True, text=True).stdout
        time.sleep(1)


def test_recipe_failure_cancels_dependents_and_reruns_submit_only_what_is_needed(cluster, tiny_c4, tmp_path,
                                                                                monkeypatch):
    """Four stages (two tiny pretrainings, a finetune of each); pretrain/std fails (its checkpoints folder is a
    file). A rerun while the jobs are queued submits nothing; the failure cancels the std finetune; after the
    fault is removed a rerun submits exactly pretrain/std and its finetune. pretrain/pause keeps 2 of 3 saves."""
    from pause_megatron.recipe import is_done, load_recipe, plan

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    recipe = dict(pretrain={"overrides": ["parallel.tensor=1", "train.steps=6", "train.save_interval=2",
                                          "train.keep_checkpoints=2", "train.eval_interval=0"]},
                  stages=["pretrain", "finetune"], variants=["StdPT_StdFT", "PausePT_StdFT"])
    out = tmp_path / "out"
    fault = out / "pretrain" / "std" / "checkpoints"
    fault.parent.mkdir(parents=True)
    fault.write_text("not a folder")
    std_ft, pause_ft = "finetune/StdPT/piqa/none0/seed0", "finetune/PausePT/piqa/none0/seed0"
    every = ["pretrain/pause", "pretrain/std", pause_ft, std_ft]

    # held in the queue, so that the rerun finds every job pending
    assert _submitted(_run_recipe(_recipe(tmp_path, tiny_c4, sbatch_args=["--hold"], **recipe))) == sorted(every)
    path = _recipe(tmp_path, tiny_c4, **recipe)
    again = _run_recipe(path)
    assert _submitted(again) == [] and sum(line.startswith("wait ") for line in again) == 4, again
    stages = {s.key: s for s in plan(load_recipe(path))}
    jobs = [json.loads((out / key / "stage.json").read_text())["job"] for key in every]
    subprocess.run(["scontrol", "release", ",".join(jobs)], env=cluster, check=True)
    _wait_for_queue_to_empty(cluster)

    assert [k for k in every if is_done(stages[k])] == ["pretrain/pause", pause_ft]
    assert not list((out / std_ft).glob("slurm-*.out"))  # never started: cancelled when pretrain/std failed
    assert sorted(p.name for p in (out / "pretrain/pause/checkpoints").glob("iter_*")) == ["iter_0000004",
                                                                                           "iter_0000006"]
    fault.unlink()
    assert _submitted(_run_recipe(path)) == sorted(["pretrain/std", std_ft])
    _wait_for_queue_to_empty(cluster)
    assert all(is_done(stages[k]) for k in every), [(k, (out / k / "stage.json").read_text()) for k in every]


def _log_of(out: Path) -> str:
    return "".join(p.read_text() for p in sorted(out.glob("slurm-*.out")))


def test_recipe_stage_stopped_by_usr1_saves_requeues_and_completes(cluster, tiny_c4, tmp_path, monkeypatch):
    """A pretraining stage gets SIGUSR1 (what `--signal` sends before the time limit; the flag itself is checked
    in test_recipe_slurm) once it logged step 2: it saves and exits 75, run_step requeues the job, the requeued
    job resumes from the checkpoint, and the stage ends done."""
    from pause_megatron.recipe import is_done, load_recipe, plan

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    out = tmp_path / "out" / "pretrain" / "pause"
    steps = 60
    path = _recipe(tmp_path, tiny_c4, stages=["pretrain"], variants=["PausePT_PauseFT"],
                   pretrain={"overrides": ["parallel.tensor=1", f"train.steps={steps}", "train.eval_interval=0",
                                           "optim.warmup_steps=1"]})
    _run_recipe(path)
    (stage,) = plan(load_recipe(path))
    job = json.loads((out / "stage.json").read_text())["job"]

    def logged_step() -> int:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0

    deadline = time.time() + 300
    while logged_step() < 2:
        assert time.time() < deadline, _log_of(out)[-4000:]
        time.sleep(0.1)
    subprocess.run(["scancel", "-s", "USR1", job], env=cluster, check=True)
    # Slurm holds a requeued job ~2 minutes (its begin time) so that the old allocation is gone first: start it
    deadline, pending_since = time.time() + 300, None
    while not is_done(stage):
        assert time.time() < deadline, _log_of(out)[-4000:]
        queue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=cluster, capture_output=True,
                               text=True).stdout.split()
        if not queue:  # the job ended: done (checked below) or failed
            break
        if queue == ["PENDING", "BeginTime"]:
            pending_since = pending_since or time.time()
            if time.time() - pending_since > 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster)
        time.sleep(0.5)
    text = _log_of(out)
    assert is_done(stage), text[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{steps:07d}"
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint saved", text)
    assert stopped and int(stopped.group(1)) < steps and "requeueing job" in text, text[-4000:]
    assert f"resumed from {out}/checkpoints/iter_{int(stopped.group(1)):07d}" in text, text[-4000:]
