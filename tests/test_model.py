"""Model presets build with Megatron-Core's GPTModel and have the paper's sizes."""

import json

import pytest

from helpers import python

PAPER_PARAMS = {"130m": 136e6, "1b": 1.3e9}  # Goyal et al.: 136M and ~1B ("1.3B" with embeddings)


@pytest.fixture(scope="module")
def counts():
    proc = python("-m", "pause_megatron.model", "tiny", "130m", "1b", timeout=300)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(rows)  # shown with -s: the parameter counts
    return {r["preset"]: r["parameters"] for r in rows}


def test_130m_has_about_136m_parameters(counts):
    assert counts["130m"] == pytest.approx(PAPER_PARAMS["130m"], rel=0.02)


def test_1b_has_about_1_3b_parameters(counts):
    assert counts["1b"] == pytest.approx(PAPER_PARAMS["1b"], rel=0.05)


def test_tiny_is_small_enough_for_a_cpu(counts):
    assert counts["tiny"] < 10e6
