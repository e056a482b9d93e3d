"""Recipes reuse only what is still valid (issue 18): stage identities, Slurm markers, dependency checks, the
report's comparisons, and plan-time validation for the stage's own world size without this machine's hardware.

Planning, marking and the report run in this process (no Megatron code runs: only configs are resolved and a
real SQLite MLflow store is read); the fake `sbatch` records the job scripts that the Slurm executor submits.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, python
from test_recipe import MICRO, write_recipe


# A report cell of one seed whose evaluation logged no row count (these tests log scores alone).
ONE = " ± 0.0 [no interval: row count not logged] (n=?, 1 seed)"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their config files relative to the repository


def _recipe(tmp_path, **changes):
    from pause_megatron.recipe import load_recipe

    return load_recipe(write_recipe(tmp_path, **changes))


def _with(section: str, **values) -> dict:
    return {section: {**MICRO[section], **values}}


def _undone_after(tmp_path, changes: dict, *, config_edit=None) -> list[str]:
    """Mark every stage of the micro recipe done, change it, and return the stages that are no longer done."""
    from pause_megatron.recipe import is_done, mark_done, plan

    ft_yaml = tmp_path / "finetune.yaml"
    shutil.copy(ROOT / "recipes" / "finetune.yaml", ft_yaml)
    base = _with("finetune", config=str(ft_yaml))
    for stage in plan(_recipe(tmp_path, **base)):
        mark_done(stage)
    if config_edit:
        ft_yaml.write_text(ft_yaml.read_text().replace(*config_edit))
    merged = {**base, **changes}
    if "finetune" in changes:
        merged["finetune"] = {**base["finetune"], **changes["finetune"]}
    return [s.key for s in plan(_recipe(tmp_path, **merged)) if not is_done(s)]


def test_a_changed_finetune_yaml_reruns_exactly_its_finetunes_evaluations_and_report(tmp_path):
    undone = _undone_after(tmp_path, {}, config_edit=("weight_decay: 0.0", "weight_decay: 0.01"))
    assert undone and all(k.startswith(("finetune/", "evaluate/")) or k == "report" for k in undone)
    assert "report" in undone and any(k.startswith("finetune/") for k in undone)
    assert "data" not in undone and not any(k.startswith("pretrain/") for k in undone)


def test_a_changed_pretraining_reruns_everything_downstream(tmp_path):
    pre = {**MICRO["pretrain"], "overrides": [*MICRO["pretrain"]["overrides"], "optim.lr=5e-3"]}
    undone = _undone_after(tmp_path, {"pretrain": pre})
    assert "data" not in undone
    assert {"pretrain/pause", "pretrain/std", "report"} <= set(undone)
    assert all(k in undone for k in ("finetune/PausePT/piqa/append1/seed0", "evaluate/StdPT/piqa/none0/seed0/none0"))


def test_changed_data_settings_rerun_data_and_everything_after(tmp_path):
    from pause_megatron.recipe import plan

    undone = _undone_after(tmp_path, {"data": {**MICRO["data"], "vocab_size": 700}})
    assert len(undone) == len(plan(_recipe(tmp_path))) and undone[0] == "data"


def test_an_ablation_recipe_on_the_same_output_reruns_the_report_and_reuses_the_rest(tmp_path):
    undone = _undone_after(tmp_path, {"ablations": {"filler": [3]}})
    assert "report" in undone and "evaluate/StdPT/piqa/none0/seed0/filler3" in undone
    assert not any(k.startswith(("finetune/", "pretrain/", "data")) for k in undone)


def _pre(*extra) -> dict:
    return {"pretrain": {**MICRO["pretrain"], "overrides": [*MICRO["pretrain"]["overrides"], *extra]}}


def _ft(*extra, **values) -> dict:
    return {"finetune": {**MICRO["finetune"], **values, "overrides": [*MICRO["finetune"]["overrides"], *extra]}}


def test_tracking_names_order_and_logging_settings_rerun_nothing(tmp_path):
    pre = MICRO["pretrain"]["overrides"]
    for changes in ({"tracking": {"uri": f"sqlite:///{tmp_path}/other.db", "experiment": "x"}},
                    {"tracking": {"enabled": False}}, {"name": "renamed"},
                    {"pretrain": {**MICRO["pretrain"], "overrides": [*reversed(pre)]}},
                    _pre("train.log_interval=3", "train.eval_interval=2", "train.eval_steps=1",
                         "train.save_interval=2"),
                    _ft("train.log_interval=2")):
        assert _undone_after(tmp_path, changes) == [], changes


def test_a_real_change_reruns_exactly_what_depends_on_it(tmp_path):
    from pause_megatron.recipe import full_plan

    everything = [s.key for s in full_plan(_recipe(tmp_path))]
    downstream = [k for k in everything if k not in ("data", "pretrain/pause", "pretrain/std")]
    assert _undone_after(tmp_path, _pre("optim.lr=1e-3")) == [k for k in everything if k != "data"]
    assert _undone_after(tmp_path, _pre("train.steps=7")) == [k for k in everything if k != "data"]
    assert _undone_after(tmp_path, _ft("train.seed=5")) == downstream
    m2 = _undone_after(tmp_path, _ft(m_ft=[1, 3]))  # M_ft=1 stays; 2 is no longer planned, 3 is new
    assert set(m2) == {"report", "finetune/PausePT/piqa/append3/seed0",
                       "evaluate/PausePT/piqa/append3/seed0/append3"}, m2


def test_pretraining_without_a_data_stage_depends_on_the_shards_it_reads(tmp_path):
    from pause_megatron.recipe import is_done, mark_done, plan

    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"format_version": 1, "tokenizer_sha256": "aa", "seq_length": 128, "pause_ratio": 0.1, "seed": 0,
                "dtype": "uint16", "complete": True, "totals": {"windows": 10}, "shards": []}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    changes = dict(stages=["pretrain"], data={"path": str(shards)})
    for s in plan(_recipe(tmp_path, **changes)):
        mark_done(s)
    assert all(is_done(s) for s in plan(_recipe(tmp_path, **changes)))
    (shards / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_sha256": "bb"}))
    assert not any(is_done(s) for s in plan(_recipe(tmp_path, **changes)))


def test_finetuning_depends_on_the_contents_of_its_task_files(tmp_path):
    from pause_megatron.recipe import is_done, mark_done, plan

    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "pause_megatron" / "sample_tasks", tasks)
    changes = _ft(task_dir=str(tasks))
    for s in plan(_recipe(tmp_path, **changes)):
        mark_done(s)
    train = next((tasks / "piqa").glob("train*"))
    train.write_text(train.read_text().replace("a", "b", 1))
    undone = [s.key for s in plan(_recipe(tmp_path, **changes)) if not is_done(s)]
    assert undone and all(k.startswith(("finetune/", "evaluate/")) or k == "report" for k in undone)
    assert not any(k.startswith(("data", "pretrain/")) for k in undone)


def test_alternating_settings_restore_earlier_finished_outputs_and_never_collide(tmp_path):
    """lr 1e-3, 2e-3, 1e-3, 2e-3: the third and fourth runs put back what the first and second made."""
    from pause_megatron.recipe import claim, is_done, mark_done, plan, restore

    def stage(lr):
        return next(s for s in plan(_recipe(tmp_path, **_pre(f"optim.lr={lr}"))) if s.key == "pretrain/pause")

    made = {}
    for lr in ("1e-3", "2e-3", "1e-3", "2e-3"):
        s = stage(lr)
        if not (is_done(s) or restore(s, log=lambda *_: None)):
            claim(s, log=lambda *_: None)
            (tmp_path / "out" / "pretrain" / "pause" / "weights").write_text(lr)
            mark_done(s)
            made[lr] = made.get(lr, 0) + 1
        assert is_done(s) and (tmp_path / "out" / "pretrain" / "pause" / "weights").read_text() == lr
    assert made == {"1e-3": 1, "2e-3": 1}  # each setting ran once
    # An unfinished output of an identity already set aside gets a numbered name, nothing is overwritten.
    s = stage("3e-3")
    claim(s, log=lambda *_: None)
    claim(stage("2e-3"), log=lambda *_: None)  # sets aside 3e-3's unfinished output
    claim(s, log=lambda *_: None)
    claim(stage("2e-3"), log=lambda *_: None)
    asides = sorted(p.name for p in (tmp_path / "out" / "pretrain").iterdir() if f"replaced-{s.identity}" in p.name)
    assert asides == [f"pause.replaced-{s.identity}", f"pause.replaced-{s.identity}.2"]


def test_the_data_stage_is_never_restored_from_an_earlier_output(tmp_path):
    """Its shards live at data.path, outside its folder: a set-aside data folder holds no data to put back."""
    from pause_megatron.recipe import claim, mark_done, plan, restore

    def data_stage(vocab):
        return next(s for s in plan(_recipe(tmp_path, data={**MICRO["data"], "vocab_size": vocab})) if s.kind == "data")

    for vocab in (600, 700):
        claim(data_stage(vocab), log=lambda *_: None)
        mark_done(data_stage(vocab))
    assert not restore(data_stage(600), log=lambda *_: None)


def test_a_changed_stage_keeps_its_old_output_aside_and_starts_afresh(tmp_path):
    from pause_megatron.recipe import claim, plan, read_marker, write_marker

    stage = next(s for s in plan(_recipe(tmp_path)) if s.key == "pretrain/pause")
    write_marker(stage.out, stage.key, "0ldidentity", done=True)
    (tmp_path / "out" / "pretrain" / "pause" / "weights").write_text("old")
    claim(stage, log=lambda *_: None)
    assert (tmp_path / "out" / "pretrain" / "pause.replaced-0ldidentity" / "weights").read_text() == "old"
    assert read_marker(stage.out) == {"key": stage.key, "identity": stage.identity, "done": False}


def test_a_stage_subset_refuses_dependencies_that_have_not_finished(tmp_path):
    from pause_megatron.recipe import load_recipe, run

    for stages, named in ((["evaluate"], "needs stage finetune/PausePT/piqa/append1/seed0"),
                          (["finetune", "evaluate"], "needs stage pretrain/pause")):
        lines = []
        path = write_recipe(tmp_path, stages=stages, tracking={"enabled": False})
        assert run(load_recipe(path), recipe_path=path, log=lines.append) == 2
        assert any(named in line for line in lines), lines
        assert not (tmp_path / "out").exists()  # nothing ran


def test_slurm_mark_job_writes_the_identity_known_at_submission(tmp_path, monkeypatch):
    from test_recipe_slurm import FAKE_SBATCH, FAKE_SQUEUE

    from pause_megatron.recipe import is_done, load_recipe, plan, run

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(tmp_path / "jobs"))
    slurm = {"executor": "slurm", "gpus_per_node": 1}
    path = write_recipe(tmp_path, launch=slurm, tracking={"enabled": False})
    submitted = plan(load_recipe(path))
    assert run(load_recipe(path), recipe_path=path, log=lambda *_: None) == 0

    # The recipe is edited while the jobs wait in the queue; then the pretraining job ends and marks its stage.
    edited = {**MICRO["pretrain"], "overrides": [*MICRO["pretrain"]["overrides"], "optim.lr=5e-3"]}
    write_recipe(tmp_path, launch=slurm, tracking={"enabled": False}, pretrain=edited)
    scripts = [(tmp_path / "jobs" / f"job{i}").read_text().splitlines()[-1] for i in range(len(submitted))]
    script = next(open(p).read() for p in scripts if "pause_megatron.pretrain" in open(p).read()
                  and "data.variant=pause" in open(p).read())
    mark = script.splitlines()[-1]  # the job's last line, after its training step
    proc = subprocess.run(["bash", "-c", mark], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PAUSE_HOME": str(ROOT),
                               "PAUSE_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    ran = next(s for s in submitted if s.key == "pretrain/pause")
    assert is_done(ran)  # what ran is marked: the identity planned at submission
    now = next(s for s in plan(load_recipe(path)) if s.key == "pretrain/pause")
    assert not is_done(now)  # the edited stage never ran


# ---- the report --------------------------------------------------------------------------------------------

SCORES = {("append", 10): 0.50, ("append", 50): 0.30, ("prepend", 10): 0.45, ("prepend", 50): 0.25}


def _prepend_recipe(tmp_path):
    return _recipe(tmp_path, variants=["PausePT_PauseFT"], ablations={"prepend": True},
                   finetune={**MICRO["finetune"], "m_ft": [10, 50]})


def _log_evaluations(r, stages, skip=()):
    """One MLflow run per evaluate stage, tagged as pause_megatron.evaluate tags it, in a real SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=r.tracking.uri)
    exp = client.create_experiment(r.tracking.experiment)
    for s in stages:
        if s.key in skip:
            continue
        tags = dict(a.split("=", 1) for a, flag in zip(s.argv[1:], s.argv) if flag == "--tag")  # as evaluate tags
        run = client.create_run(exp, tags={"stage": "evaluate", **tags})
        client.log_metric(run.info.run_id, "piqa/acc", SCORES[(s.tags["placement"], int(s.tags["m_ft"]))])
        client.set_terminated(run.info.run_id)


def test_report_compares_prepending_with_appending_at_the_same_m_ft(tmp_path):
    from pause_megatron.recipe import plan
    from pause_megatron.report import build_report

    r = _prepend_recipe(tmp_path)
    _log_evaluations(r, [s for s in plan(r) if s.kind == "evaluate"])
    text = build_report(r, log=lambda *_: None)
    section = text.split("## Appending vs prepending")[1]
    row = {int(line.split("|")[2]): line for line in section.splitlines() if line.startswith("| piqa |")}
    assert f"50.0{ONE}" in row[10].split("|")[3] and f"45.0{ONE}" in row[10].split("|")[4]
    assert f"30.0{ONE}" in row[50].split("|")[3] and f"25.0{ONE}" in row[50].split("|")[4]
    assert f"50.0{ONE} (M_ft=10)" in text  # the main table: the better M_ft, with its n
    assert "chosen on the reported evaluation split" in text
    # The M_ft section: one column per M_ft (appended pauses), and its plot (test_recipe's run has one M_ft).
    assert f"| PausePT_PauseFT | piqa | 50.0{ONE} | 30.0{ONE} |" in text.split("## M_ft")[1].split("##")[0]
    assert (tmp_path / "out" / "report" / "m_ft.png").exists()


def test_report_fails_on_a_missing_score_unless_the_stage_result_file_has_it(tmp_path):
    from pause_megatron.recipe import RESULT, mark_done, plan
    from pause_megatron.report import ReportError, build_report

    r = _prepend_recipe(tmp_path)
    stages = [s for s in plan(r) if s.kind == "evaluate"]
    lost = next(s for s in stages if s.tags["placement"] == "prepend" and s.tags["m_ft"] == "10")
    _log_evaluations(r, stages, skip={lost.key})
    with pytest.raises(ReportError, match=lost.key):
        build_report(r, log=lambda *_: None)
    os.makedirs(lost.out)
    with open(os.path.join(lost.out, RESULT), "w") as fh:
        json.dump({"scores": {"piqa": {"acc": 0.45}}}, fh)
    with pytest.raises(ReportError, match=lost.key):  # a result file of a stage not marked finished: not used
        build_report(r, log=lambda *_: None)
    mark_done(lost)
    text = build_report(r, log=lambda *_: None)
    assert f"| piqa | 10 | 50.0{ONE} | 45.0{ONE} |" in text


def test_report_never_takes_the_score_of_an_earlier_configuration(tmp_path):
    """An evaluation logged under the old identity (a newer MLflow run than the current result) is not used."""
    from mlflow.tracking import MlflowClient

    from pause_megatron.recipe import RESULT, mark_done, plan
    from pause_megatron.report import build_report

    r = _prepend_recipe(tmp_path)
    stages = [s for s in plan(r) if s.kind == "evaluate"]
    changed = next(s for s in stages if s.tags["placement"] == "prepend" and s.tags["m_ft"] == "10")
    _log_evaluations(r, stages, skip={changed.key})
    os.makedirs(changed.out)
    with open(os.path.join(changed.out, RESULT), "w") as fh:
        json.dump({"scores": {"piqa": {"acc": 0.45}}}, fh)
    mark_done(changed)
    client = MlflowClient(tracking_uri=r.tracking.uri)  # a later run of the same stage key, another identity
    stale = client.create_run(client.get_experiment_by_name(r.tracking.experiment).experiment_id,
                              tags={"stage": "evaluate", **changed.tags, "recipe": r.name, "stage_identity": "0ld"})
    client.log_metric(stale.info.run_id, "piqa/acc", 0.99)
    text = build_report(r, log=lambda *_: None)
    assert f"| piqa | 10 | 50.0{ONE} | 45.0{ONE} |" in text and "99.0" not in text


# ---- planning and the command line ----------------------------------------------------------------------

def test_the_stdpt_pretraining_run_is_not_named_after_the_pause_config(tmp_path):
    from pause_megatron.config import load_config
    from pause_megatron.recipe import plan

    r = _recipe(tmp_path, variants=["StdPT_StdFT"], pretrain={"config": "recipes/pretrain_1b_pause.yaml"})
    (std,) = [s for s in plan(r) if s.key == "pretrain/std"]
    argv = std.argv[std.argv.index("--config") + 2:std.argv.index("--tag")]
    cfg = load_config("recipes/pretrain_1b_pause.yaml", argv)
    assert cfg.data.variant == "std" and "pause" not in cfg.tracking.run_name


def cli(*args):
    return python("-m", "pause_megatron.cli", "recipe", *args, check=False, timeout=300)


def test_dry_run_takes_overrides_after_the_flag(tmp_path):
    proc = cli("run", write_recipe(tmp_path), "--dry-run", "name=renamed")
    assert proc.returncode == 0, proc.stderr
    assert "recipe renamed:" in proc.stdout


def test_prepend_ablation_without_a_pausept_variant_is_a_clear_error(tmp_path):
    proc = cli("run", write_recipe(tmp_path, variants=["StdPT_StdFT"], ablations={"prepend": True}), "--dry-run")
    assert proc.returncode == 2 and "ablations.prepend" in proc.stderr and "Traceback" not in proc.stderr


SLURM_8 = {"launch": {"executor": "slurm", "gpus_per_node": 8},  # and a finetune batch that 8 ranks can split
           "finetune": {**MICRO["finetune"],
                        "overrides": [*MICRO["finetune"]["overrides"], "train.global_batch_size=16"]}}


def test_plan_checks_the_batch_split_for_the_stage_world_size(tmp_path):
    # global 16 / micro 4 fits 1 rank, not the 8 ranks (DP 8) that a node of the cluster gives the stage
    pre = {**MICRO["pretrain"], "overrides": ["parallel.tensor=1", "train.steps=6", "train.global_batch_size=16",
                                             "train.micro_batch_size=4"]}
    proc = cli("run", write_recipe(tmp_path, **SLURM_8, pretrain=pre), "--dry-run")
    assert proc.returncode == 2 and "global_batch_size=16" in proc.stderr and "8 ranks" in proc.stderr


def test_an_fp8_plan_is_submittable_from_a_cpu_machine(tmp_path):
    pre = {**MICRO["pretrain"], "overrides": ["parallel.tensor=1", "train.steps=6", "train.global_batch_size=64",
                                             "train.micro_batch_size=8", "precision.dtype=bf16",
                                             "precision.fp8=hybrid"]}
    proc = cli("run", write_recipe(tmp_path, **SLURM_8, pretrain=pre), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "pretrain/pause" in proc.stdout

