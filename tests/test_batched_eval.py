"""Batched evaluation and padded-to-longest finetuning give the answers of one request / full padding at a time.

Tiny pretrained model, CPU, float32; Megatron runs in subprocesses (tests/dist/eval_batched.py, ft_padding.py).
Planted defects and what they did: docs/testing.md.
"""

import json

import pytest

from helpers import ROOT, python, torchrun

pytestmark = pytest.mark.slow

SAMPLES = str(ROOT / "pause_megatron" / "sample_tasks")
# Batched and one-at-a-time scoring do the same float32 arithmetic in matmuls of other shapes (padding), which
# moves a log-likelihood (a sum of ~10-60 log-probabilities, magnitude 10-300) by ~1e-6 relative; a padding or
# position defect moves it by 1e-2 or more (docs/testing.md).
LL_REL = 1e-5
# Finetuning losses (scale ~5) padded to the longest example vs to seq_length: same sums over the same target
# tokens, matmuls of other widths; measured differences ~1e-7 relative, three steps apart.
LOSS_REL = 1e-5


@pytest.fixture(scope="module")
def batched(pretrained):
    proc = python(str(ROOT / "tests" / "dist" / "eval_batched.py"), "--checkpoint", str(pretrained),
                  "--data-dir", SAMPLES, "--batch-size", "3")
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("BATCHED ")][-1][8:])


def test_batched_multiple_choice_scores_equal_one_request_at_a_time(batched):
    """In batches, a question's endings share their context's computation (`score_shared`): the model
    computes fewer positions than the requests hold (batch 1 computes them all, once each)."""
    mc = batched["multiple_choice"]
    assert len(mc["single"]) == len(mc["batched"]) == len(mc["direct"]) > 20
    assert mc["contexts"] < len(mc["single"])
    assert mc["positions"]["single"] == mc["positions"]["rows"]
    assert mc["positions"]["batched"] < mc["positions"]["rows"]
    for (ll_d, greedy_d), (ll_1, greedy_1), (ll_b, greedy_b) in zip(mc["direct"], mc["single"], mc["batched"]):
        assert ll_b == pytest.approx(ll_d, rel=LL_REL) and ll_1 == pytest.approx(ll_d, rel=LL_REL)
        assert greedy_b == greedy_1 == greedy_d


def test_batched_is_greedy_flags_equal_one_request_at_a_time_and_some_are_true(batched):
    g = batched["greedy_continuations"]
    assert [f for _, f in g["batched"]] == [f for _, f in g["single"]] == [f for _, f in g["direct"]]
    assert sum(f for _, f in g["direct"]) >= 4  # the model's own greedy continuations
    assert [ll for ll, _ in g["batched"]] == pytest.approx([ll for ll, _ in g["direct"]], rel=LL_REL)


def test_batched_stop_aware_generation_equals_full_generation_cut_at_the_stop_strings(batched):
    """The texts equal batch-1 decoding, and both equal decoding every row to max_gen_toks, then cutting.

    Some rows must actually end at a stop string (else the stop-aware path is not exercised), and the decoders
    must stop there: at batch 1 exactly one forward per token up to the one that completes a stop string (some
    span a token boundary: a check on the last token alone runs on), fewer again in batches. The requests ask
    for different max_gen_toks, within one batch too.
    """
    g = batched["generation"]
    assert g["batched"] == g["single"] == g["reference"]
    assert g["stopped_early"] >= 3
    assert len(g["max_gen_toks"]) == 3
    calls = g["forward_calls"]
    assert calls["single"] == calls["expected_single"]
    assert calls["batched"] < calls["single"] < calls["reference"]


def test_batched_rolling_loglikelihood_equals_one_window_at_a_time(batched):
    r = batched["rolling"]
    assert max(r["windows"]) > 1  # texts of several windows, batched with other texts' windows
    assert r["batched"] == pytest.approx(r["direct"], rel=LL_REL)
    assert r["single"] == pytest.approx(r["direct"], rel=LL_REL)


def _ftpad(proc):
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("FTPAD ")][-1][6:])


def test_finetuning_padded_to_the_longest_example_gives_the_losses_of_full_padding(pretrained):
    """One process: padded to each microbatch's longest vs to seq_length. Two pipeline stages (interleaved,
    two chunks each): one width for the step's microbatches (the stages exchange activations of one shape),
    the same losses as one process."""
    args = [str(ROOT / "tests" / "dist" / "ft_padding.py"), "--checkpoint", str(pretrained), "--data-dir", SAMPLES]
    out = _ftpad(python(*args))
    pp = _ftpad(torchrun(*args, "--arms", "longest", "parallel.pipeline=2", "parallel.virtual_pipeline=2",
                         nproc=2))["longest"]
    longest, full = out["longest"], out["full"]
    assert longest["tokens"] == full["tokens"]
    assert longest["losses"] == pytest.approx(full["losses"], rel=LOSS_REL)
    assert all(w == out["max_width"] for ws in full["widths"] for w in ws)
    assert all(w % 8 == 0 and w < out["max_width"] for ws in longest["widths"] for w in ws)
    assert len({w for ws in longest["widths"] for w in ws}) > 1  # microbatches of different widths
    for arm in (longest, full, pp):  # the work training logs (tokens/s, TFLOPs, MFU): the padded widths computed
        assert arm["positions"] == [[sum(2 * w for w in ws), sum(2 * w * w for w in ws)] for ws in arm["widths"]]
    assert pp["tokens"] == longest["tokens"]
    assert pp["losses"] == pytest.approx(longest["losses"], rel=LOSS_REL)
    assert all(len(set(ws)) == 1 and max(ws) == w for ws, w in zip(pp["widths"], map(max, longest["widths"])))
