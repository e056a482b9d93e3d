"""pauses.source=online: the std shards with pauses injected as they are read equal the offline pause shards,
at any ratio, on every rank and across a kill -9; the pause-ratio sweep: its plan, its refusals, its report."""

import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

from helpers import python, torchrun
from test_pretrain import _rank_pids, _start, _wait_for_checkpoint, metrics
from test_recipe import MICRO, cli, write_recipe
from test_recipe_reuse import _in_repo, _recipe  # noqa: F401  (_in_repo: an autouse fixture)


def test_paused_lengths_are_the_lengths_inject_pauses_gives():
    """GPTDataset builds its indices from these lengths before any token is read: they must be exact."""
    from pause_megatron.pauses import inject_pauses, paused_lengths

    rng = np.random.default_rng(0)
    lengths = np.array([1, 5, 100, 115, 116, 127, 128, 128], dtype=np.int32)
    for ratio in (0.0, 0.05, 0.1, 0.2):
        got = paused_lengths(lengths, seq_length=128, ratio=ratio)
        want = [len(inject_pauses(np.zeros(n, np.uint16), pause_id=1, seq_length=128, rng=rng, ratio=ratio))
                for n in lengths]
        assert got.dtype == np.int32 and got.tolist() == want


@pytest.mark.parametrize("overrides,named", [
    (["pauses.ratio=-0.1"], "pauses.ratio"), (["pauses.ratio=1.0"], "pauses.ratio"),
    (["pauses.source=both"], "pauses.source"),
    (["data.variant=std"], "pauses.source=online injects PausePT's pauses, but data.variant=std"),
])
def test_a_bad_ratio_or_source_is_refused_by_the_config(overrides, named):
    from pause_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, ["pauses.source=online", *overrides])


def test_a_bad_sweep_ratio_is_refused_before_any_stage_runs(tmp_path):
    proc = cli("run", write_recipe(tmp_path, ablations={"pause_ratio": [0.05, -0.1]}), check=False)
    assert proc.returncode == 2 and "ablations.pause_ratio: every ratio must be in [0, 1)" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratios,named", [  # pretrain_tiny: seq_length 128; the main PausePT at 0.1 has M_pt 13
    ([1.0], "every ratio must be in [0, 1), got 1.0"),
    ([0.05, 0.05], "0.05 and 0.05 are one run (pretrain/pause-r0.05)"),
    ([0.2, 0.2000001], "0.2 and 0.2000001 are one run (pretrain/pause-r0.2)"),
    ([0.0], "0.0 gives M_pt = round(0.0 x 128) = 0 pauses per window, as StdPT does"),
    ([0.003], "0.003 gives M_pt = round(0.003 x 128) = 0 pauses per window, as StdPT does"),
    ([0.1], "= 13 pauses per window, as the main PausePT (pauses.ratio=0.1) does"),
    ([0.101], "= 13 pauses per window, as the main PausePT (pauses.ratio=0.1) does"),
    ([0.2, 0.203], "0.203 gives M_pt = round(0.203 x 128) = 26 pauses per window, as ratio 0.2 does"),
])
def test_sweep_ratios_that_are_no_new_run_are_refused_naming_the_field(tmp_path, ratios, named):
    from pause_megatron.config import ConfigError
    from pause_megatron.recipe import full_plan

    with pytest.raises(ConfigError, match=r"ablations\.pause_ratio: .*" + re.escape(named)):
        full_plan(_recipe(tmp_path, ablations={"pause_ratio": ratios}))


VARIANTS = ["StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT"]


def _sweep_plan(tmp_path, ratios=(0.05, 0.2)):
    from pause_megatron.recipe import full_plan

    r = _recipe(tmp_path, variants=VARIANTS, ablations={"pause_ratio": list(ratios)},
                finetune={**MICRO["finetune"], "m_ft": [1]})
    return r, full_plan(r)


def _argv_value(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"{name}="))


def test_each_sweep_ratio_is_pretrained_online_and_finetuned_and_evaluated_from_its_own_run(tmp_path):
    """The plan, stage by stage: each PausePT-r<ratio> finetune starts from pretrain/pause-r<ratio> (its checkpoints
    and its dependency), and every stage of the sweep carries its ratio and an identity of its own."""
    r, stages = _sweep_plan(tmp_path)
    by_key = {s.key: s for s in stages}
    main = by_key["pretrain/pause"]
    assert "pauses.source" not in main.inputs["config"]  # offline, the default: identities as before it existed
    assert main.tags["pause_ratio"] == "0.1" and _argv_value(main.argv, "data.variant") == "pause"
    identities = {"0.1": {s.key.split("/", 2)[2]: s.identity for s in stages
                          if s.key.startswith(("finetune/PausePT/", "evaluate/PausePT/"))}}
    for ratio in ("0.05", "0.2"):
        pre = by_key[f"pretrain/pause-r{ratio}"]
        assert (_argv_value(pre.argv, "pauses.source"), _argv_value(pre.argv, "pauses.ratio")) == ("online", ratio)
        assert _argv_value(pre.argv, "data.variant") == "pause" and pre.tags["pause_ratio"] == ratio
        config = pre.inputs["config"]
        assert config["pauses.source"] == "online" and config["pauses.ratio"] == float(ratio)
        finetunes = [s for s in stages if s.key.startswith(f"finetune/PausePT-r{ratio}/")]
        evaluations = [s for s in stages if s.key.startswith(f"evaluate/PausePT-r{ratio}/")]
        # as many as the main PausePT's: PausePT_StdFT (none0) and PausePT_PauseFT (append1), one task and seed
        assert sorted(s.key.split("/")[3] for s in finetunes) == ["append1", "none0"]
        assert len(evaluations) == 2
        for s in finetunes:
            assert _argv_value(s.argv, "train.init_from") == f"{r.output_dir}/pretrain/pause-r{ratio}/checkpoints"
            assert s.deps == [f"pretrain/pause-r{ratio}"]
            assert s.tags["pause_ratio"] == ratio and s.tags["ablation"] == "pause_ratio"
        for s in evaluations:
            assert s.tags["pause_ratio"] == ratio and s.tags["ablation"] == "pause_ratio"
            assert _argv_value(s.argv, "pause_ratio") == ratio  # the --tag the report reads back from MLflow
            assert by_key[s.deps[0]] in finetunes
        identities[ratio] = {s.key.split("/", 2)[2]: s.identity for s in finetunes + evaluations}
    assert identities["0.05"].keys() == identities["0.2"].keys() == identities["0.1"].keys()
    for rest in identities["0.1"]:  # the same finetune or evaluation of another pretrained model: another stage
        assert len({identities[ratio][rest] for ratio in identities}) == 3, rest


RATIO_SCORES = {("StdPT", None): 0.30, ("PausePT", "0.05"): 0.35, ("PausePT", "0.1"): 0.40, ("PausePT", "0.2"): 0.45}


def test_report_plots_score_against_ratio_with_stdpt_as_ratio_zero(tmp_path):
    from mlflow.tracking import MlflowClient

    from pause_megatron.report import build_report

    r, stages = _sweep_plan(tmp_path)
    client = MlflowClient(tracking_uri=r.tracking.uri)
    exp = client.create_experiment(r.tracking.experiment)
    for s in stages:
        if s.kind != "evaluate":
            continue
        tags = dict(a.split("=", 1) for a, flag in zip(s.argv[1:], s.argv) if flag == "--tag")  # as evaluate tags
        run = client.create_run(exp, tags={"stage": "evaluate", **tags})
        score = RATIO_SCORES[(s.tags["variant"].split("_")[0], tags.get("pause_ratio"))]
        client.log_metric(run.info.run_id, "piqa/acc", score + (0.1 if s.tags["variant"].endswith("PauseFT") else 0))
        client.set_terminated(run.info.run_id)
    text = build_report(r, log=lambda *_: None)
    section = text.split("## Pretraining pause ratio (PausePT)")[1].split("##")[0]
    def points(*scores):  # ratio 0 is StdPT, 0.1 the main PausePT, 0.05 and 0.2 the sweep
        return ", ".join(f"{ratio}: {score} ± 0.0" for ratio, score in zip((0, 0.05, 0.1, 0.2), scores))

    assert f"| PausePT_StdFT | piqa | 0 | {points(30.0, 35.0, 40.0, 45.0)} |" in section
    assert f"| PausePT_PauseFT | piqa | 1 | {points(40.0, 45.0, 50.0, 55.0)} |" in section
    png = tmp_path / "out" / "report" / "pause_ratio.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ratio_sweep_recipe_plans_online_runs_from_the_one_data_prep():
    out = cli("run", "recipes/ablations_ratio_130m.yaml", "--dry-run", "finetune.tasks=[squad]",
              "finetune.seeds=[4]").stdout  # one task and seed: the whole plan takes a minute to resolve
    for ratio in ("0.05", "0.2"):
        assert f"pretrain/pause-r{ratio} " in out
        assert f"finetune/PausePT-r{ratio}/squad/append50/seed4" in out
        assert f"evaluate/PausePT-r{ratio}/squad/none0/seed4/none0" in out
    assert "pretrain/pause-r0 " not in out and "pretrain/pause-r0.1" not in out  # StdPT and the main PausePT
    assert "pretrain/pause " in out and "pretrain/std " in out


@pytest.fixture(scope="module")
def gap_data(tiny_c4, tmp_path_factory):
    """tiny_c4's input through data prep again, as shards 2 and 5 (a gap: shard index is not position), at
    --seed 4321 (not the default, nor the train.seed of tests/dist/online_windows.py) and --pause-ratio 0.2."""
    root = tmp_path_factory.mktemp("gap")
    (root / "json").mkdir()
    for name, index in zip(sorted(os.listdir(tiny_c4.parent / "json")), (2, 5)):
        shutil.copy(tiny_c4.parent / "json" / name, root / "json" / f"c4-train.{index:05d}-of-01024.json.gz")
    python("-m", "data_prep.build_c4", "build", "--input", str(root / "json"), "--output", str(root / "out"),
           "--tokenizer", str(tiny_c4 / "tokenizer.model"), "--seq-length", "128", "--pause-ratio", "0.2",
           "--seed", "4321", "--workers", "1")
    return root / "out"


@pytest.mark.slow
def test_online_samples_equal_the_offline_pause_shards_token_for_token(gap_data, tmp_path):
    manifest = json.loads((gap_data / "manifest.json").read_text())
    assert manifest["seed"] == 4321 and [s["shard_index"] for s in manifest["shards"]] == [2, 5]
    specs = [f"{gap_data},pause,offline,0.2", f"{gap_data},pause,online,0.2", f"{gap_data},std,offline,0.2",
             f"{gap_data},pause,online,0.0"]
    proc = torchrun("tests/dist/online_windows.py", str(tmp_path), *specs)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    offline, online, std, on0 = (got[s] for s in specs)
    for want, have in ((offline, online), (std, on0)):  # ratio 0 online is StdPT
        assert (have["train"], have["valid"]) == (want["train"], want["valid"])
        assert have["pauses"] == want["pauses"]
        assert have["weights"] == want["weights"]  # the blend across shards: from the paused lengths
    assert online["weights"] != std["weights"]  # (which are not the std lengths)
    assert online["windows_equal_pause_shards"]  # every window of every shard, not only the samples drawn
    assert online["pauses"] > 0 == on0["pauses"]
    error = online["length_mismatch_error"] or "no error"
    assert "window 0 has 128 tokens with its pauses but its paused length is 127" in error


@pytest.mark.slow
def test_online_training_is_the_same_at_dp2_across_a_kill_and_resume_as_at_dp1(tiny_c4, tmp_path):
    """Ratio 0.2 is not the pause shards' 0.1: only online injection can serve it. Bit for bit across the kill is
    not asked (DP=2 sums in another order than DP=1): a different sample would move the loss far more."""
    args = ["train.steps=8", "train.save_interval=4", "pauses.source=online", "pauses.ratio=0.2"]
    torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={tmp_path / 'dp1'}",
             "model.preset=tiny", "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=2",
             "tracking.enabled=false", *args)
    proc = _start(tiny_c4, tmp_path / "dp2", *args, nproc=2)
    _wait_for_checkpoint(tmp_path / "dp2", 4, proc)
    os.kill(_rank_pids(proc.pid)[-1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    resumed = torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={tmp_path / 'dp2'}",
                       "model.preset=tiny", "train.global_batch_size=8", "train.micro_batch_size=2",
                       "optim.warmup_steps=2", "tracking.enabled=false", *args, nproc=2)
    assert "resumed from" in resumed.stdout
    dp1, dp2 = metrics(tmp_path / "dp1"), metrics(tmp_path / "dp2")
    for step in range(1, 9):
        assert dp2[step]["train/loss"] == pytest.approx(dp1[step]["train/loss"], rel=1e-5), f"step {step}"
        assert dp2[step]["train/loss_tokens"] == dp1[step]["train/loss_tokens"], f"step {step}"


