"""The real sbatch launchers on a real two-node Slurm cluster (both slurmd on this machine, CPU, gloo).

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (`make test` installs them when run as root;
see tests/slurm/install.sh). Without them these tests are reported as skipped, with the reason.
"""

import os
import shutil
import subprocess
import sys
import time

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
