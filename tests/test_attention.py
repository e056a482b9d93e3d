"""The local spec's SDPA core attention equals Megatron's DotProductAttention, in training and KV-cached decoding.

Both models share every weight and differ only in the spec's `core_attention` submodule. Tolerance: fp32, the
two compute the same softmax(QK^T / sqrt(d))V in a different order (fused kernel vs baddbmm + softmax), so
results differ by float rounding: ~3e-7 on logits of order 1 and ~7e-7 relative on gradients here. We allow
1e-5 (logits) and 1e-4 (gradients, relative to each tensor's largest entry); a wrong scale, a mask off by one
position or a lost head moves them by >1e-2. Parallel layouts with SDPA: tests/test_parallel.py.
"""

import pytest

from helpers import ROOT, read_json, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "result.json"
    torchrun(ROOT / "tests" / "dist" / "attention_check.py", "--out", str(out), timeout=300)
    return read_json(out)


def test_only_core_attention_differs(result):
    assert set(result["swapped_modules"]) == {"DotProductAttention", "FusedScaleMaskSoftmax", "SDPAttention"}


def test_training_forward_and_gradients_match_megatron(result):
    assert result["loss"][0] == pytest.approx(result["loss"][1], abs=1e-5)
    assert result["logits_max_abs_diff"] < 1e-5
    assert result["grad_max_rel_diff"] < 1e-4


def test_kv_cached_decoding_matches_recomputation(result):
    for name in ("sdpa", "megatron"):
        assert result[f"{name}_greedy_equal"]
        assert result[f"{name}_kv_logits_max_abs_diff"] < 1e-5
    assert result["sdpa_vs_megatron_decode_logits_max_abs_diff"] < 1e-5


def test_queries_shorter_than_keys_are_causal_bottom_right(result):
    """Two new tokens per cached step: top-left alignment (is_causal) or no mask would differ by ~1e-1."""
    assert result["sdpa_chunk1_max_abs_diff"] < 1e-5
    assert result["sdpa_chunk2_max_abs_diff"] < 1e-5
