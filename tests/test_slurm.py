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


def test_recipe_stage_at_its_time_limit_saves_requeues_and_completes(cluster, tiny_c4, tmp_path, monkeypatch):
    """A pretraining stage with a 1-minute limit: Slurm's USR1 makes it save and exit 75, run_step requeues the
    job, the requeued job resumes from the checkpoint, and the stage ends done. Its steps are twice what this
    machine trains in one allocation (measured first), so that it cannot finish without a requeue. Slurm sends
    USR1 at its first 30-s check with at most 5 + 30 s left: 25-55 s into the minute."""
    from pause_megatron.recipe import is_done, load_recipe, plan

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    out = tmp_path / "out" / "pretrain" / "pause"

    def recipe(steps):
        return _recipe(tmp_path, tiny_c4, stages=["pretrain"], variants=["PausePT_PauseFT"], signal="USR1@5",
                       pretrain={"time": "1", "overrides": ["parallel.tensor=1", f"train.steps={steps}",
                                                            "train.eval_interval=0", "optim.warmup_steps=1"]})

    def wait(until, seconds=600):
        """Poll until `until()`. Slurm holds a requeued job ~2 minutes (its begin time) so that the old
        allocation is gone first: 5 s are enough here, then the test starts it."""
        deadline, pending_since = time.time() + seconds, {}
        while not until():
            assert time.time() < deadline, _log_of(out)[-4000:]
            queue = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], env=cluster, capture_output=True, text=True)
            for job, state, reason in (line.split(None, 2) for line in queue.stdout.splitlines()):
                if state == "PENDING" and reason.strip() == "BeginTime":
                    if time.time() - pending_since.setdefault(job, time.time()) > 5:
                        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster)
                        pending_since.pop(job)
            time.sleep(1)

    _run_recipe(recipe(100_000))  # far more than a minute's work: how far does one allocation get?
    wait(lambda: "requeueing job" in _log_of(out))
    subprocess.run(["scancel", json.loads((out / "stage.json").read_text())["job"]], env=cluster, check=True)
    _wait_for_queue_to_empty(cluster)
    per_allocation = int(re.search(r"stopped by SIGUSR1 at step (\d+)", _log_of(out)).group(1))
    steps = 2 * per_allocation + 2

    path = recipe(steps)  # another identity: the calibration run is set aside, this one starts afresh
    _run_recipe(path)
    (stage,) = plan(load_recipe(path))
    wait(lambda: is_done(stage) or "exited with exit code 1" in _log_of(out).lower())
    text = _log_of(out)
    assert is_done(stage), text[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{steps:07d}"
    assert re.search(r"stopped by SIGUSR1 at step \d+; checkpoint saved", text) and "requeueing job" in text
    assert re.search(rf"resumed from {out}/checkpoints/iter_\d+ at step \d+", text), text[-4000:]
