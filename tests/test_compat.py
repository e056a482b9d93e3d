"""The compatibility layer (pause_megatron/compat.py): every supported megatron-core release behaves the same.

Each test names the difference it covers; docs/compatibility.md lists them with the release that made them.
Megatron-Core runs in subprocesses here too (the CPU emulation is process-wide).
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, python, read_json, subprocess_env, torchrun

LAYOUT = ROOT / "tests" / "dist" / "train_layout.py"
KV_DECODE = ROOT / "tests" / "dist" / "kv_decode.py"
TRAIN = ["train.steps=2", "optim.warmup_steps=1", "optim.lr=1e-3", "train.global_batch_size=4",
         "train.micro_batch_size=2"]
INIT_SEED = "train.seed=7"  # saved weights differ from a fresh model's (seed 0), so a load that did nothing shows
RTOL = 1e-5  # as in test_parallel: summation order only
LOGIT_ATOL = 1e-4  # cached vs recomputed decoding: see test_cached_decoding_returns_last_logits_and_matches...()


def test_installed_release_is_in_the_supported_range():
    from pause_megatron.compat import SUPPORTED, mcore_version

    low, high = SUPPORTED
    assert low <= mcore_version() < high


def test_each_shim_takes_the_branch_of_the_release_that_changed_it():
    """Shims detect features; the releases named in compat.py's comments must agree with what they detect."""
    probe = ("import contextlib, json\n"
             "from megatron.core.inference.contexts import StaticInferenceContext\n"
             "from pause_megatron import compat\n"
             "def logits_switch_in_config():\n"
             "    context = StaticInferenceContext(1, 8)\n"
             "    compat.logits_at_every_position(context)\n"
             "    config = getattr(context, 'config', None)\n"
             "    return config is not None and config.materialize_only_last_token_logits is False\n"
             "print(json.dumps({'version': compat.mcore_version(),\n"
             "    'cuda_graph_modules': 'cuda_graph_modules' in compat.no_cuda_graph_modules(),\n"
             "    'inference_switch': not isinstance(compat.inference_mode(), contextlib.nullcontext),\n"
             "    'logits_switch_in_config': logits_switch_in_config()}))")
    got = json.loads(python("-c", probe).stdout.strip().splitlines()[-1])
    version = tuple(got["version"])
    assert got["cuda_graph_modules"] == (version >= (0, 18, 0))
    assert got["inference_switch"] == (version >= (0, 18, 0))
    assert got["logits_switch_in_config"] == (version >= (0, 19, 0))


def test_building_the_model_logs_no_upstream_deprecation():
    """0.19 logs "GPTModel IS DEPRECATED" per chunk; 0.16 and 0.19 warn "full scope is deprecated" per config."""
    proc = python("-m", "pause_megatron.model", "tiny", PYTHONWARNINGS="default")
    assert "DEPRECATED" not in proc.stderr
    assert "full scope is deprecated" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("position_embedding", ["rope", "learned_absolute"])
def test_cached_decoding_returns_last_logits_and_matches_recomputation(tmp_path, position_embedding):
    """0.18 made inference mode an explicit switch: without it the prefill returns logits for every position.

    Both position embeddings: with RoPE, Megatron takes a cached token's position from `sequence_len_offset`
    and ignores `position_ids`; with learned absolute positions, `position_ids` decide, so only this case sees
    `greedy_generate` giving a new token the position of the one before it (docs/testing.md).
    """
    out = tmp_path / "kv.json"
    python(str(KV_DECODE), "--out", str(out), f"model.position_embedding={position_embedding}")
    got = read_json(out)
    assert got["prefill_logits_shape"][:2] == [2, 1]
    assert got["cached"] == got["full"]
    # Per-step logits, not only tokens: float32 summation order moves them by ~1e-7 (scale ~0.2), a new token
    # at the position and cache slot of the one before it by ~3e-2; the script checks the latter is seen.
    assert got["max_logit_diff"] < LOGIT_ATOL
    assert got["shifted_max_logit_diff"] > 10 * LOGIT_ATOL
    # The same comparison through evaluation's decoding loop.
    assert got["generate"]["cached"] == got["generate"]["full"]
    assert got["generate"]["max_logit_diff"] < LOGIT_ATOL, got["generate"]["max_logit_diff"]


@pytest.mark.slow
def test_a_checkpoint_keeps_the_common_state_file_that_older_releases_read(tmp_path):
    """0.19 keeps the common state inside the shards; 0.16-0.18 read it only from common.pt."""
    torchrun(LAYOUT, "--out", "/dev/null", "--save-init", str(tmp_path / "ckpt"), *TRAIN)
    common = tmp_path / "ckpt" / "iter_0000000" / "common.pt"
    assert common.is_file()
    check = f"import torch; s = torch.load({str(common)!r}, weights_only=False); print(s['step'], sorted(s))"
    assert python("-c", check).stdout.startswith("0 ")


# --- across releases: needs the other leg's virtual environment beside this one (CI: the second leg) -------


def other_release_python() -> Path | None:
    """An interpreter of another virtual environment in the checkout with a different megatron-core."""
    ours = importlib.metadata.version("megatron-core")
    ask = "import importlib.metadata as m; print(m.version('megatron-core'))"
    for candidate in sorted(ROOT.glob(".venv*/bin/python")):
        if Path(sys.prefix).resolve() == candidate.parent.parent.resolve():
            continue
        proc = subprocess.run([str(candidate), "-c", ask], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip() != ours:
            return candidate
    return None


def run_layout(interpreter: Path, *args: str) -> None:
    cmd = [str(interpreter), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(LAYOUT)]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + list(args))} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def releases():
    other = other_release_python()
    if other is None:
        pytest.skip("no virtual environment with another megatron-core release in this checkout "
                    "(make test && make test PY=3.12 installs both)")
    return {"this": Path(sys.executable), "other": other}


@pytest.mark.slow
@pytest.mark.parametrize("saved_by,loaded_by", [("this", "other"), ("other", "this")])
def test_a_checkpoint_trains_on_under_the_other_release(tmp_path, releases, saved_by, loaded_by):
    """Weights saved (at TP=1) by one release load in the other and give the same losses as in the saver."""
    ckpt = tmp_path / "ckpt"
    run_layout(releases[saved_by], "--out", "/dev/null", "--save-init", str(ckpt), *TRAIN, INIT_SEED)
    curves = {}
    for who in (saved_by, loaded_by):
        run_layout(releases[who], "--out", str(tmp_path / f"{who}.json"), "--init-from", str(ckpt), *TRAIN)
        curves[who] = read_json(tmp_path / f"{who}.json")
    fresh = tmp_path / "fresh.json"
    run_layout(releases[loaded_by], "--out", str(fresh), *TRAIN)
    for got, want in zip(curves[loaded_by], curves[saved_by]):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
    assert curves[loaded_by][0]["loss"] != pytest.approx(read_json(fresh)[0]["loss"], rel=RTOL)
