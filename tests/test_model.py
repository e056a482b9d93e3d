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


GELU_CHECK = """
import json, torch, torch.nn.functional as F
from megatron.core.fusions.fused_bias_gelu import bias_gelu  # what Megatron fuses F.gelu + bias into on a GPU
from pause_megatron.config import load_config
from pause_megatron.kernels import Kernels
from pause_megatron.model import transformer_config
x = torch.linspace(-6, 6, 2001)
fused_kernel = bias_gelu(torch.zeros(()), x)
out = {}
for gelu in ("tanh", "exact"):
    for fused in (False, True):  # the CPU's and a GPU's kernel choice
        k = Kernels(spec="local", persist_layer_norm=False, gradient_accumulation_fusion=False,
                    bias_activation_fusion=fused, bias_dropout_fusion=fused, apply_rope_fusion=False,
                    sdpa_attention=True)
        tc = transformer_config(load_config(None, ["model.spec=local", f"model.gelu={gelu}"]), cuda=False, kernels=k)
        y = fused_kernel if tc.bias_activation_fusion and tc.activation_func is F.gelu else tc.activation_func(x)
        out[f"{gelu},{fused}"] = [float((y - fused_kernel).abs().max()), float((y - F.gelu(x)).abs().max())]
print(json.dumps(out))
"""


def test_gelu_is_one_function_whichever_kernels_run():
    """model.gelu=tanh computes Megatron's fused bias-GELU (tanh form) also where that fusion is off (the CPU),
    and model.gelu=exact computes F.gelu also where it would be on (a GPU). Megatron fuses only when
    activation_func is F.gelu (megatron/core/transformer/mlp.py); its kernel runs here uncompiled."""
    proc = python("-c", GELU_CHECK, TORCHDYNAMO_DISABLE="1", PAUSE_MEGATRON_CPU="1")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for fused in ("False", "True"):
        to_kernel, to_exact = out[f"tanh,{fused}"]
        assert to_kernel < 1e-6 and to_exact > 1e-4, out
        to_kernel, to_exact = out[f"exact,{fused}"]
        assert to_exact == 0.0 and to_kernel > 1e-4, out
