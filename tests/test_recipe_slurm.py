"""The recipe's Slurm executor (issue 19): resources by stage kind, throttled submission, stages whose jobs are
queued or running left alone, the launch path shared with slurm/ (requeue after a stop), the array script's checks.

Unit tests run `recipe run` with a fake `sbatch` (records its arguments, answers a job id) and a fake `squeue`
(prints the jobs a test says are queued); the real-cluster scenarios are in tests/test_slurm.py.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from test_recipe import MICRO, write_recipe

FAKE_SBATCH = """#!/bin/sh
n=$(ls "$SBATCH_LOG" 2>/dev/null | wc -l)
mkdir -p "$SBATCH_LOG"
for a in "$@"; do printf '%s\\n' "$a"; done > "$SBATCH_LOG/job$n"
echo "$((1000 + n))"
"""
FAKE_SQUEUE = """#!/bin/sh
[ -z "$SQUEUE_JOBS" ] || echo "$@" > "$SQUEUE_JOBS.args"
cat "$SQUEUE_JOBS" 2>/dev/null || true
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(tmp_path / "jobs"))
    monkeypatch.setenv("SQUEUE_JOBS", str(tmp_path / "squeue.txt"))
    return tmp_path


def _queued(tmp_path, jobs: dict) -> None:
    """jobs: id -> state, or id -> (state, comment) as squeue's `%i %T %k` prints them."""
    (tmp_path / "squeue.txt").write_text("".join(
        f"{j} {state}\n" if isinstance(state, str) else f"{j} {state[0]} {state[1]}\n" for j, state in jobs.items()))


def _submitted(tmp_path) -> dict:
    """job id -> (stage key read from the script's marker line, sbatch arguments)."""
    out = {}
    for i in range(len(list((tmp_path / "jobs").glob("job*")))):
        args = (tmp_path / "jobs" / f"job{i}").read_text().splitlines()
        key = open(args[-1]).read().splitlines()[-1].split()[-2]
        out[str(1000 + i)] = (key, args)
    return out


def _run(tmp_path, changes=None, **launch):
    from pause_megatron.recipe import load_recipe, run

    path = write_recipe(tmp_path, launch={"executor": "slurm", "gpus_per_node": 1, **launch},
                        tracking={"enabled": False}, **(changes or {}))
    lines = []
    code = run(load_recipe(path), recipe_path=path, log=lines.append)
    return code, lines


def test_resources_follow_the_stage_kind_and_one_gpu_is_asked_for(fake_slurm):
    code, lines = _run(fake_slurm, gpus_per_node=1, cpus_per_task=3)
    assert code == 0, lines
    jobs = _submitted(fake_slurm)
    for key, args in jobs.values():
        script = open(args[-1]).read()
        gpu = key.startswith(("pretrain/", "finetune/", "evaluate/"))
        assert ("--gpus-per-node=1" in args) == gpu, (key, args)
        # a GPU stage cannot be talked onto the CPU by a PAUSE_MEGATRON_CPU=1 the submitting shell exported
        assert ("export PAUSE_REQUIRE_GPU=1 PAUSE_MEGATRON_CPU=0" in script) == gpu, key
        assert "--kill-on-invalid-dep=yes" in args and "--requeue" in args
        assert "--open-mode=append" in args  # a requeued job appends to its log instead of overwriting it
        assert "export PAUSE_MAX_REQUEUES=3" in script
        assert "source " in script and "slurm/common.sh" in script and "run_step " in script
        if key == "data":
            assert "--cpus-per-task=2" in args and "--time=24:00:00" in args  # data.workers, data.time
        if gpu:
            assert "--cpus-per-task=3" in args
        # only training saves at the time-limit warning; data_prep and evaluation would only start over
        assert ("--signal=USR1@300" in args) == key.startswith(("pretrain/", "finetune/")), (key, args)


def test_cpu_stages_on_slurm_run_nproc_ranks_per_node_on_purpose(fake_slurm):
    ft = {**MICRO["finetune"], "overrides": [*MICRO["finetune"]["overrides"], "train.global_batch_size=4"]}
    code, lines = _run(fake_slurm, {"finetune": ft}, gpus_per_node=0, nproc=2)
    assert code == 0, lines
    for key, args in _submitted(fake_slurm).values():
        if key.startswith("pretrain/"):
            assert "--ntasks-per-node=2" in args and not any(a.startswith("--gpus") for a in args)
            assert "export PAUSE_MEGATRON_CPU=1" in open(args[-1]).read()


def test_submission_is_throttled_and_resumes_without_duplicates(fake_slurm):
    _queued(fake_slurm, {"99": "RUNNING"})  # another job of this user
    code, lines = _run(fake_slurm, max_jobs=3)
    assert code == 0 and any("launch.max_jobs is 3" in line for line in lines), lines
    first = _submitted(fake_slurm)
    assert [k for k, _ in first.values()] == ["data", "pretrain/pause"]
    # later: 99 ended, the two recipe jobs are still queued
    _queued(fake_slurm, {"1000": "RUNNING", "1001": "PENDING"})
    code, lines = _run(fake_slurm, max_jobs=3)
    assert code == 0
    jobs = _submitted(fake_slurm)
    keys = [k for k, _ in jobs.values()]
    assert keys == ["data", "pretrain/pause", "pretrain/std"]  # one more, nothing twice
    assert "--dependency=afterok:1000" in jobs["1002"][1]  # waits for the data job still queued
    _queued(fake_slurm, {j: "PENDING" for j in jobs})
    code, lines = _run(fake_slurm, max_jobs=100)
    keys = [k for k, _ in _submitted(fake_slurm).values()]
    assert code == 0 and len(keys) == len(set(keys)) == 10, keys
    ft = next(args for k, args in _submitted(fake_slurm).values() if k == "finetune/PausePT/piqa/append1/seed0")
    assert "--dependency=afterok:1001" in ft


def test_a_rerun_while_jobs_are_queued_submits_nothing_and_moves_nothing(fake_slurm):
    assert _run(fake_slurm)[0] == 0
    jobs = _submitted(fake_slurm)
    _queued(fake_slurm, {j: "PENDING" for j in jobs})
    code, lines = _run(fake_slurm)
    assert code == 0 and len(_submitted(fake_slurm)) == len(jobs), lines
    # the recipe changed while the pretraining job is queued: its folder is neither set aside nor resubmitted
    from pause_megatron.recipe import load_recipe, run

    pre = {**MICRO["pretrain"], "overrides": [*MICRO["pretrain"]["overrides"], "optim.lr=5e-3"]}
    path = write_recipe(fake_slurm, launch={"executor": "slurm", "gpus_per_node": 1}, tracking={"enabled": False},
                        pretrain=pre)
    lines = []
    assert run(load_recipe(path), recipe_path=path, log=lines.append) == 0
    assert len(_submitted(fake_slurm)) == len(jobs), lines
    assert not list((fake_slurm / "out").glob("pretrain/*.replaced-*"))
    assert any(line.startswith("hold pretrain/pause: job") for line in lines), lines


def test_a_left_out_dependency_is_not_put_back_over_a_running_job(fake_slurm):
    """Configuration A finished its pretraining; B (another learning rate) then submitted its own, now running
    in the same folders. A with stages=[finetune] must not move B's folders to restore A's output: held."""
    from pause_megatron.recipe import full_plan, load_recipe, mark_done, read_marker

    no_data = {**MICRO["data"], "input": None}
    a = load_recipe(write_recipe(fake_slurm, stages=["pretrain"], data=no_data))
    for s in full_plan(a):
        if s.kind == "pretrain":
            mark_done(s)
    pre_b = {**MICRO["pretrain"], "overrides": [*MICRO["pretrain"]["overrides"], "optim.lr=5e-3"]}
    code, lines = _run(fake_slurm, {"stages": ["pretrain"], "data": no_data, "pretrain": pre_b})
    assert code == 0 and len(_submitted(fake_slurm)) == 2, lines  # A's outputs set aside, B's jobs queued
    _queued(fake_slurm, {"1000": "RUNNING", "1001": "RUNNING"})
    code, lines = _run(fake_slurm, {"stages": ["finetune"], "data": no_data})
    assert code == 0, lines
    out = fake_slurm / "out" / "pretrain"
    assert read_marker(str(out / "pause"))["job"] == "1000" and read_marker(str(out / "std"))["job"] == "1001"
    assert not any("restored" in line for line in lines), lines
    assert any(line.startswith("hold pretrain/pause (not in stages): job 1000") for line in lines), lines
    assert len(_submitted(fake_slurm)) == 2  # the finetunes wait for a later run
    # B's jobs ended (finished or not): now A's outputs are put back and its finetunes submitted
    _queued(fake_slurm, {})
    code, lines = _run(fake_slurm, {"stages": ["finetune"], "data": no_data})
    assert code == 0 and sum("restored its finished output" in line for line in lines) == 2, lines
    # three finetunes (B's job scripts went aside with its folders)
    assert len(list((fake_slurm / "jobs").glob("job*"))) == 2 + 3


def test_a_job_named_by_its_comment_counts_as_the_stages_job(fake_slurm, monkeypatch):
    """A stage's job whose id was never recorded (sbatch timed out after Slurm took it; an older stage.json) is
    found by its --comment: not submitted twice. squeue lists array elements (-r) and hidden partitions (--all)
    of this uid's user, not $USER's."""
    import pwd

    from pause_megatron.recipe import load_recipe, plan, write_marker
    from pause_megatron.slurm import stage_comment

    path = write_recipe(fake_slurm, launch={"executor": "slurm", "gpus_per_node": 1}, tracking={"enabled": False})
    pre = next(s for s in plan(load_recipe(path)) if s.key == "pretrain/pause")
    write_marker(pre.out, pre.key, pre.identity, done=False)  # claimed, but sbatch's answer was lost
    _queued(fake_slurm, {"555_3": ("RUNNING", stage_comment(pre.identity, pre.out)), "556": "PENDING"})
    monkeypatch.setenv("USER", "someone-else")
    code, lines = _run(fake_slurm, max_jobs=100)
    assert code == 0 and "wait pretrain/pause: job 555_3 is running" in lines, lines
    jobs = _submitted(fake_slurm)
    keys = [k for k, _ in jobs.values()]
    assert "pretrain/pause" not in keys and len(keys) == 9
    ft = next(args for k, args in jobs.values() if k == "finetune/PausePT/piqa/append1/seed0")
    assert "--dependency=afterok:555_3" in ft
    std = next(s for s in plan(load_recipe(path)) if s.key == "pretrain/std")
    assert f"--comment={stage_comment(std.identity, std.out)}" in next(a for k, a in jobs.values() if k == std.key)
    assert any(a == "--job-name=micro:finetune/PausePT/piqa/append1/seed0" for a in ft)
    args = (fake_slurm / "squeue.txt.args").read_text().split()
    assert "-r" in args and "--all" in args and args[args.index("-u") + 1] == pwd.getpwuid(os.getuid()).pw_name


def test_a_dependency_left_out_but_restorable_is_not_missing(tmp_path, monkeypatch):
    from pause_megatron.recipe import full_plan, load_recipe, mark_done, missing_dependencies

    monkeypatch.chdir(ROOT)
    r = load_recipe(write_recipe(tmp_path, stages=["finetune"], data={**MICRO["data"], "input": None}))
    everything = full_plan(r)
    pre = next(s for s in everything if s.key == "pretrain/pause")
    mark_done(pre)
    os.rename(pre.out, f"{pre.out}.replaced-{pre.identity}")  # set aside by a run of another configuration
    assert [line for line in missing_dependencies(r, everything) if "pretrain/pause" in line] == []
    assert any("pretrain/std" in line for line in missing_dependencies(r, everything))


def test_dry_run_prints_gpus_hours_and_disk(tmp_path):
    from test_recipe_reuse import cli

    pre = {**MICRO["pretrain"], "overrides": [*MICRO["pretrain"]["overrides"][:-1], "train.save_interval=2"]}
    proc = cli("run", write_recipe(tmp_path, pretrain=pre), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("stage"))
    assert header.split()[-3:] == ["GPUs", "hours", "disk"]
    total = next(line for line in proc.stdout.splitlines() if line.startswith("total:"))
    assert "GPU-hours" in total and "B of checkpoints" in total
    kept = cli("run", write_recipe(tmp_path, pretrain={
        **pre, "overrides": [*pre["overrides"], "train.keep_checkpoints=1"]}), "--dry-run")
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}

    def disk(out):
        value, unit = next(line for line in out.splitlines() if line.startswith("pretrain/pause")).split()[-2:]
        return float(value) * units[unit]

    # 6 steps, a save every 2: 3 kept; keeping 1, a save still holds 2 at once (the new one before the old goes)
    assert disk(kept.stdout) * 3 == pytest.approx(disk(proc.stdout) * 2, rel=0.05)


def test_dry_run_hours_of_finetuning_and_evaluation_follow_the_measured_task_figures(tmp_path, monkeypatch):
    """In-process (the planner runs no Megatron): finetune and evaluate stages get hours from the per-task
    figures `perf.measured_rates` holds (positions computed per finetuning example; requests per document and
    positions per request in evaluation), printed with their basis; doubling a task's figure doubles them
    (a little more: the attention term grows with the width)."""
    import copy

    from pause_megatron import perf, recipe

    monkeypatch.chdir(ROOT)
    path = write_recipe(tmp_path)
    measured = perf.measured_rates()

    def planned(rates):
        monkeypatch.setattr(perf, "measured_rates", lambda: rates)
        lines = []
        recipe.print_plan(recipe.load_recipe(path), log=lines.append)
        return {s.key: s.estimate_s for s in recipe.plan(recipe.load_recipe(path))}, lines

    base, lines = planned(measured)
    stages = {kind: [k for k in base if k.startswith(kind + "/")] for kind in ("finetune", "evaluate")}
    assert all(stages.values()) and all(base[k] > 0 for keys in stages.values() for k in keys)
    for key in stages["finetune"][:1] + stages["evaluate"][:1]:
        row = next(line for line in lines if line.startswith(key))
        # the hours column (after stage 70, variant 16, GPUs 5 characters): a lower bound, marked
        assert row[94] == "≥" and float(row[95:102]) > 0
    assert next(line for line in lines if line.startswith("pretrain/std"))[94] == " "
    basis = next(line for line in lines if line.startswith("hours:"))
    assert "not measured" in basis and "measured on CPU" in basis and "positions computed per example" in basis
    assert "lower bounds" in basis and "M_ft 10" in basis and "M_inf 10" in basis and "gsm8k 256" in basis
    doubled = copy.deepcopy(measured)
    doubled["finetune"]["positions_per_example"]["piqa"] *= 2
    doubled["evaluate"]["tasks"]["piqa"]["positions_per_request"] *= 2
    more, _ = planned(doubled)
    for key in stages["finetune"] + stages["evaluate"]:
        assert 2 <= more[key] / base[key] < 2.5
    assert more["pretrain/std"] == base["pretrain/std"]



def test_dry_run_hours_move_with_each_stages_pauses_and_fall_back_without_measured_figures(tmp_path, monkeypatch):
    """The figures were measured at M_ft = M_inf = 10: a stage with other M (none0, append1, append2) computes
    M less or more positions per example or request, so figures measured at M + 5 with 5 more positions plan
    the same hours. Without the rates file, or without a task in it, the dry-run still plans (padding to
    seq_length) and its basis line says so, naming the task."""
    import copy

    from pause_megatron import perf, recipe

    monkeypatch.chdir(ROOT)
    path = write_recipe(tmp_path)
    measured = perf.measured_rates()
    assert perf.measured_rates(str(tmp_path / "absent.json")) == {}

    def planned(rates):
        monkeypatch.setattr(perf, "measured_rates", lambda: rates)
        lines = []
        recipe.print_plan(recipe.load_recipe(path), log=lines.append)
        basis = next(line for line in lines if line.startswith("hours:"))
        return {s.key: s.estimate_s for s in recipe.plan(recipe.load_recipe(path)) if s.estimate_s}, basis

    base, _ = planned(measured)
    ft = [base[f"finetune/{pt}/piqa/{m}/seed0"] for pt, m in (("StdPT", "none0"), ("PausePT", "append1"),
                                                               ("PausePT", "append2"))]
    ev = [base[f"evaluate/{pt}/piqa/{m}/seed0/{m}"] for pt, m in (("StdPT", "none0"), ("PausePT", "append1"),
                                                                   ("PausePT", "append2"))]
    assert ft[0] < ft[1] < ft[2] and ev[0] < ev[1] < ev[2]
    moved = copy.deepcopy(measured)
    moved["finetune"]["m_ft"] += 5
    moved["finetune"]["positions_per_example"]["piqa"] += 5
    moved["evaluate"]["m_inf"] += 5
    moved["evaluate"]["tasks"]["piqa"]["positions_per_request"] += 5
    same, _ = planned(moved)
    assert same == pytest.approx(base, rel=1e-9)

    padded, basis = planned({})
    assert "measured_rates.json missing" in basis
    assert all(padded[k] > base[k] for k in base if k.startswith(("finetune/", "evaluate/")))
    assert padded["pretrain/std"] == base["pretrain/std"]
    without = copy.deepcopy(measured)
    del without["finetune"]["positions_per_example"]["piqa"], without["evaluate"]["tasks"]["piqa"]
    hours, basis = planned(without)
    assert hours == padded
    assert "no measured finetuning figure for piqa" in basis and "no measured evaluation figure for piqa" in basis

# ---- slurm/finetune_eval_array.sh with fake srun/scontrol: what runs after a stop, and the array's size ------

FAKE_SRUN = """#!/bin/sh
echo "srun $*" >> "$CALLS"
case "$*" in *pause_megatron.finetune*) exit "${FINETUNE_EXIT:-0}";; esac
"""
FAKE_SCONTROL = """#!/bin/sh
echo "scontrol $*" >> "$CALLS"
"""


def _array(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
           "PAUSE_HOME": str(ROOT), "PAUSE_INIT": "x", "PAUSE_OUTPUT": str(tmp_path / "ft"), "SLURM_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "3", **env}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "finetune_eval_array.sh")], env=env, capture_output=True,
                          text=True)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_array_task_stopped_at_its_limit_requeues_and_evaluates_nothing(tmp_path):
    proc, calls = _array(tmp_path, FINETUNE_EXIT="75")
    assert proc.returncode == 0, proc.stderr
    assert any("pause_megatron.finetune" in c for c in calls) and "scontrol requeue 77" in calls
    assert not any("pause_megatron.evaluate" in c for c in calls)
    (tmp_path / "finished").mkdir()
    proc, calls = _array(tmp_path / "finished")  # a finetune that ends: its evaluation follows
    assert proc.returncode == 0 and any("pause_megatron.evaluate" in c for c in calls)


def test_an_array_smaller_than_the_sweep_is_refused(tmp_path):
    proc, calls = _array(tmp_path, SLURM_ARRAY_TASK_COUNT="5")
    assert proc.returncode == 2 and "9 tasks x 5 seeds = 45" in proc.stderr and calls == []
    proc, calls = _array(tmp_path, SLURM_ARRAY_TASK_COUNT="5", PAUSE_ARRAY_PART="1")
    assert proc.returncode == 0, proc.stderr


def test_retention_keeps_the_newest_n_complete_checkpoints_up_to_latest(tmp_path):
    from pause_megatron.checkpoint import COMPLETE, prune

    def make(root, complete, partial=()):
        root.mkdir()
        for step in complete:
            (root / f"iter_{step:07d}").mkdir()
            (root / f"iter_{step:07d}" / COMPLETE).write_text("")
        for step in partial:
            (root / f"iter_{step:07d}").mkdir()
        (root / "tokenizer.model").write_text("x")
        return root

    def left(root):
        return sorted(p.name for p in root.iterdir())

    # a save at step 6 that `latest` names: 8 (left by another run) is not this save's to judge; 2 goes
    root = make(tmp_path / "a", complete=(2, 4, 6, 8))
    assert [os.path.basename(p) for p in prune(str(root), keep=2, newest=6)] == ["iter_0000002"]
    assert left(root) == ["iter_0000004", "iter_0000006", "iter_0000008", "tokenizer.model"]
    # a save cut short at 4 does not count among the 2 kept, and goes: a newer complete one (6) is there
    root = make(tmp_path / "b", complete=(2, 6), partial=(4,))
    prune(str(root), keep=2, newest=6)
    assert left(root) == ["iter_0000002", "iter_0000006", "tokenizer.model"]
    # nothing complete besides: an incomplete folder older than the newest complete one goes, none newer
    root = make(tmp_path / "c", complete=(4,), partial=(2, 6))
    prune(str(root), keep=1, newest=6)
    assert left(root) == ["iter_0000004", "iter_0000006", "tokenizer.model"]


# ---- slurm/common.sh run_step: when a stopped step is requeued -------------------------------------------------

STEP_SRUN = """#!/bin/sh
echo "srun $*" >> "$CALLS"
if [ -n "${SAVED+x}" ]; then printf '%s' "$SAVED" > "$PAUSE_STOP_FILE"; fi
exit "${RC:-0}"
"""


def _step(tmp_path, **env):
    """One `run_step` of a job script (sourcing common.sh) with a fake srun: SAVED (if given) is what the ranks
    write to the stop file, RC srun's exit code. Returns (exit code, scontrol calls, srun's environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", STEP_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    script = f"set -euo pipefail; source {ROOT}/slurm/common.sh; run_step pause_megatron.pretrain; echo after"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
           "PAUSE_HOME": str(ROOT), "PAUSE_STOP_DIR": str(tmp_path / "stage"), "SLURM_JOB_ID": "88", **env}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc.returncode, [c for c in lines if c.startswith("scontrol")], proc


def test_a_stopped_step_requeues_on_its_stop_file_even_when_srun_says_137(tmp_path):
    # several ranks: srun killed the others and reports 137; the stop file says the step saved step 4
    code, scontrol, proc = _step(tmp_path, SAVED="4", RC="137")
    assert code == 0 and scontrol == ["scontrol requeue 88"] and "after" not in proc.stdout, proc.stderr
    # a crash (no stop file) is a failure, not a requeue
    code, scontrol, _ = _step(tmp_path, RC="137")
    assert code == 137 and scontrol == []


def test_requeues_without_progress_stop_after_max_requeues(tmp_path):
    """Training that saves a newer step each time is requeued every time; stops that save nothing newer (an
    evaluation saves nothing at all) are requeued PAUSE_MAX_REQUEUES times in a row, then the job fails."""
    for saved in ("2", "4", "6", "8", "10"):
        assert _step(tmp_path, SAVED=saved, RC="75", PAUSE_MAX_REQUEUES="2")[:2] == (0, ["scontrol requeue 88"])
    assert _step(tmp_path, SAVED="10", RC="75", PAUSE_MAX_REQUEUES="2")[:2] == (0, ["scontrol requeue 88"])
    assert _step(tmp_path, SAVED="10", RC="75", PAUSE_MAX_REQUEUES="2")[:2] == (0, ["scontrol requeue 88"])
    code, scontrol, proc = _step(tmp_path, SAVED="10", RC="75", PAUSE_MAX_REQUEUES="2")
    assert code == 75 and scontrol == [] and "3 times in a row" in proc.stderr
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    results = [_step(evaluation, SAVED="", RC="75")[:2] for _ in range(4)]
    assert results == [(0, ["scontrol requeue 88"])] * 3 + [(75, [])]
    # a step that finishes clears the count
    assert _step(evaluation)[0] == 0 and not list((evaluation / "stage").glob(".stop-88*"))


def test_srun_gets_the_jobs_cpus_per_task(tmp_path):
    """Slurm 22.05-23.02: srun does not inherit sbatch's --cpus-per-task; common.sh passes it on."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text('#!/bin/sh\necho "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK" >> "$CALLS"\n')
    (tmp_path / "bin" / "srun").chmod(0o755)
    calls = tmp_path / "calls"
    script = f"set -euo pipefail; source {ROOT}/slurm/common.sh; run_step pause_megatron.pretrain"
    subprocess.run(["bash", "-c", script], check=True, capture_output=True, env={
        **os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
        "PAUSE_HOME": str(ROOT), "SLURM_CPUS_PER_TASK": "6", "PAUSE_STOP_DIR": str(tmp_path)})
    assert calls.read_text().split() == ["SRUN_CPUS_PER_TASK=6"]


def test_evaluation_stops_on_usr1_with_exit_75_and_a_stop_file(tmp_path):
    """evaluate.main installs its stop handler before its slow work: a SIGUSR1 then (here: while it reads the
    task files) ends it with exit 75 and an empty stop file (nothing saved), not Python's default death."""
    stop = tmp_path / "stop"
    code = ("import os, signal, sys; import pause_megatron.tasks as t;"
            "t.load_examples = lambda *a, **k: os.kill(os.getpid(), signal.SIGUSR1) or __import__('time').sleep(30);"
            "from pause_megatron.evaluate import main; sys.exit(main(['--checkpoint', 'x', '--tasks', 'piqa']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PAUSE_STOP_FILE": str(stop)})
    assert proc.returncode == 75, proc.stderr
    assert "evaluation stopped by SIGUSR1" in proc.stderr and stop.read_text() == ""


def test_a_gpu_stage_without_a_gpu_refuses_to_run_on_the_cpu_whatever_the_shell_exported(fake_slurm, monkeypatch):
    """The job script of a GPU stage asks for a GPU and sets PAUSE_MEGATRON_CPU=0 after whatever the submitting
    shell exported (sbatch passes the environment on): runtime's GPU check then refuses to run on the CPU."""
    monkeypatch.setenv("PAUSE_MEGATRON_CPU", "1")
    code, lines = _run(fake_slurm, {"stages": ["data", "pretrain"]})
    assert code == 0, lines
    args = next(a for k, a in _submitted(fake_slurm).values() if k == "pretrain/pause")
    script = open(args[-1]).read()
    exports = script.split("source ")[0]  # what the script sets before common.sh and the steps
    probe = ("from pause_megatron.config import load_config; from pause_megatron.runtime import init_distributed;"
             "init_distributed(load_config(None, [], hardware=False))")
    proc = subprocess.run(["bash", "-c", f"{exports}\nexec {sys.executable} -c {probe!r}"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "asked for GPUs" in proc.stderr and "gpus_per_node=0" in proc.stderr, \
        proc.stderr[-2000:]
