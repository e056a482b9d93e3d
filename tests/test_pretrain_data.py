"""Pretraining data sizing and checks: several epochs over several shards, refusals at start-up."""

import json

import pytest

from helpers import python, torchrun

pytestmark = pytest.mark.slow

STEPS, BATCH = 8, 8


@pytest.fixture(scope="module")
def small_data(tiny_c4, tmp_path_factory):
    """Two shards of two documents each (a few dozen windows), made by the real data prep."""
    root = tmp_path_factory.mktemp("small")
    python("-m", "data_prep.c4_sample", str(root / "json"), "--files", "2", "--docs-per-file", "2")
    python("-m", "data_prep.build_c4", "build", "--input", str(root / "json"), "--output", str(root / "out"),
           "--tokenizer", str(tiny_c4 / "tokenizer.model"), "--seq-length", "128", "--workers", "1")
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and STEPS * BATCH > manifest["totals"]["windows"]  # more than an epoch
    return root / "out"


def pretrain(data, out, *overrides, check=True, timeout=600):
    return torchrun("-m pause_megatron.pretrain", f"data.path={data}", f"train.output_dir={out}",
                    "model.preset=tiny", f"train.global_batch_size={BATCH}", "train.micro_batch_size=4",
                    "optim.warmup_steps=1", "tracking.enabled=false", *overrides, check=check, timeout=timeout)


def test_a_run_longer_than_an_epoch_over_several_shards_trains_to_the_end(small_data, tmp_path):
    # 64 training samples from fewer windows than that (more than two epochs of the 80% split); validation
    # asks 8 samples of its few windows.
    proc = pretrain(small_data, tmp_path, f"train.steps={STEPS}", "data.split=80,20,0", "train.eval_interval=4",
                    "train.eval_steps=1")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["final_step"] == STEPS and "val/loss" in final


@pytest.mark.parametrize("split, message", [
    ("100,0,0", "the validation split (data.split=100,0,0) serves 0 samples but the run needs 8"),
    # the default 98,2,0 leaves no validation window in a shard of a dozen windows
    ("98,2,0", "its validation part of data.split=98,2,0 is empty"),
], ids=["no-validation-split", "empty-part-of-a-shard"])
def test_a_split_too_short_for_the_run_is_refused_at_start_up(small_data, tmp_path, split, message):
    proc = pretrain(small_data, tmp_path, "train.steps=4", f"data.split={split}", "train.eval_interval=2",
                    "train.eval_steps=1", check=False, timeout=300)
    assert proc.returncode != 0  # the rank exits 2; torchrun reports 1
    assert message in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_pause_ratio_other_than_the_manifests_is_refused(small_data, tmp_path):
    proc = pretrain(small_data, tmp_path, "train.steps=2", "pauses.ratio=0.2", check=False)
    assert proc.returncode != 0  # the rank exits 2; torchrun reports 1
    assert f"{small_data}/manifest.json: the pause shards were made with pause_ratio=0.1" in proc.stderr
    assert "pauses.ratio=0.2" in proc.stderr


def test_an_empty_part_is_refused_even_when_the_run_does_not_sample_from_it():
    """megatron-core builds every part with a share; with blend weights an empty one would loop forever."""
    from pause_megatron.data import DataError, _check_split_parts

    matrix = [(0.0, 0.98), (0.98, 1.0), None]  # data.split=98,2,0
    sizes = [(12, 12 * 129)]  # a shard of 12 windows: round(0.98*12) = round(12) -> an empty validation part
    with pytest.raises(DataError, match="validation part of data.split=98,2,0 is empty .* builds it all the same"):
        _check_split_parts(["shard0"], sizes, matrix, {0: 8, 1: 0}, "98,2,0")
    _check_split_parts(["shard0"], sizes, [(0.0, 1.0), None, None], {0: 8, 1: 0}, "100,0,0")
