"""MFU's denominator: the dense bf16 peak of the card torch names, per form factor; no guess for unknown cards."""

import pytest

from pause_megatron.config import load_config
from pause_megatron.perf import model_flops, model_flops_per_token, peak_tflops_bf16

H100_SXM, H100_PCIE, H100_NVL, A100 = 989.4, 756.5, 835.5, 312.0  # dense bf16 TFLOP/s, NVIDIA data sheets


@pytest.mark.parametrize("name,peak", [
    # names as torch.cuda.get_device_name() reports them
    ("NVIDIA H100 80GB HBM3", H100_SXM),
    ("NVIDIA H100 PCIe", H100_PCIE),
    ("NVIDIA H100 NVL", H100_NVL),
    ("NVIDIA H800", H100_SXM),
    ("NVIDIA H800 PCIe", H100_PCIE),
    ("NVIDIA H200", H100_SXM),
    ("NVIDIA H200 NVL", H100_NVL),
    ("NVIDIA GH200 480GB", H100_SXM),
    ("NVIDIA A100-SXM4-80GB", A100),
    ("NVIDIA A100-SXM4-40GB", A100),
    ("NVIDIA A100-PCIE-40GB", A100),
    ("NVIDIA A100 80GB PCIe", A100),
    ("NVIDIA L40S", 362.05),
])
def test_peak_by_device_name(name, peak):
    assert peak_tflops_bf16(name) == peak


@pytest.mark.parametrize("name", [
    "NVIDIA H100",  # form factor not named: SXM and PCIe differ by 30%, so no peak rather than a wrong one
    "NVIDIA H20",  # a different, much slower chip whose name is a prefix of H200
    "NVIDIA GeForce RTX 4090",
    "Tesla V100-SXM2-16GB",
])
def test_unknown_or_ambiguous_card_has_no_peak(name):
    assert peak_tflops_bf16(name) is None


def test_flops_per_token_of_the_130m_preset():
    cfg = load_config(None, ["model.preset=130m"])
    h, s, f, layers, vocab = 768, 2048, 3072, 12, 32128
    forward = layers * (2 * 3 * h * h + 2 * h * h + 2 * 2 * h * f + 2 * 2 * s * h) + 2 * h * vocab
    assert model_flops_per_token(cfg, vocab_size=vocab) == 3 * forward


def test_flops_of_padded_microbatches_count_each_at_its_width():
    """Finetuning microbatches [2, 256] and [2, 512] at seq_length 2048: each position at its own width."""
    cfg = load_config(None, ["model.preset=130m"])
    want = sum(model_flops_per_token(cfg, vocab_size=32128, seq_length=s) * 2 * s for s in (256, 512))
    got = model_flops(cfg, vocab_size=32128, positions=2 * 256 + 2 * 512, width_sum=2 * 256**2 + 2 * 512**2)
    assert got == pytest.approx(want, rel=1e-12)
    assert got < model_flops_per_token(cfg, vocab_size=32128) * 4 * 2048 / 2
