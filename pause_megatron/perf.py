"""Throughput accounting: model FLOPs per token, the GPU's peak, and MFU's convention.

MFU convention: achieved model TFLOP/s divided by the GPU's *dense bf16* peak, whatever the run's precision.
An FP8 run keeps attention (scores, values), the logits and the optimizer in bf16/fp32, so no single FP8
peak describes it; against the bf16 peak an FP8 run that is faster simply shows a higher MFU, comparable with
its bf16 run. (Megatron-LM itself prints TFLOP/s per GPU, not MFU; we report both.)
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from pause_megatron.config import Config

# Dense (no sparsity) bf16 peak TFLOP/s per GPU from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in order. Form factors of one chip differ by clock and power (H100 SXM 700 W,
# NVL 400 W, PCIe 350 W), so a name that does not say which (e.g. a bare "H100") gets no peak, not a guess.
PEAK_TFLOPS_BF16: list[tuple[str, float]] = [
    (r"\bH100\b.*\bPCIe\b", 756.5),
    (r"\bH100\b.*\bNVL\b", 835.5),
    (r"\bH100\b.*\b(SXM\d?|HBM3)\b", 989.4),  # e.g. "NVIDIA H100 80GB HBM3" is the SXM card
    (r"\bH800\b.*\bPCIe\b", 756.5),
    (r"\bH800\b", 989.4),  # the SXM card is named plainly
    (r"\bH200\b.*\bNVL\b", 835.5),
    (r"\bH200\b", 989.4),  # the SXM card is named plainly ("NVIDIA H200")
    (r"\bGH200\b", 989.4),
    (r"\bA(100|800)\b", 312.0),  # SXM4 and PCIe, 40 and 80 GB alike
    (r"\bL40S\b", 362.05),
]


def peak_tflops_bf16(device_name: str) -> Optional[float]:
    """Dense bf16 peak of the GPU called `device_name`, or None for a card not in the table."""
    for pattern, value in PEAK_TFLOPS_BF16:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return value
    return None


def peak_tflops(*, cuda: bool) -> Optional[float]:
    """This process's GPU's dense bf16 peak (the MFU denominator for every precision); None on a CPU."""
    return peak_tflops_bf16(torch.cuda.get_device_name()) if cuda else None


def model_flops_per_token(cfg: Config, *, vocab_size: int, seq_length: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), counted from the config.

    Forward per token: per layer 2*h*(h + 2*kv) QKV (kv = h * query groups / heads: h without grouped-query
    attention) + 2*h*h output projection + 2*2*h*ffn MLP (2*3*h*ffn for SwiGLU's gate, up and down) + 2*2*s*h
    attention scores and values (Megatron's convention: the causal half is not discounted); plus 2*h*V for the
    logits. `s` is the width of the sequence the token sits in (default: the config's seq_length).
    """
    m = cfg.model
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = h * (m.num_query_groups or m.num_attention_heads) // m.num_attention_heads
    s = m.seq_length if seq_length is None else seq_length
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + (6 if m.mlp == "swiglu" else 4) * h * f + 4 * s * h
    return 3.0 * (m.num_layers * per_layer + 2 * h * vocab_size)


def parameter_count(cfg: Config, *, vocab_size: int) -> int:
    """The model's parameters, counted from the config as `model_flops_per_token` counts FLOPs (grouped-query
    attention, SwiGLU, biases, norms, tied or untied embeddings; RoPE: no position table)."""
    m = cfg.model
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = h * (m.num_query_groups or m.num_attention_heads) // m.num_attention_heads
    norm = (1 if m.normalization == "RMSNorm" else 2) * h
    weights = h * (h + 2 * kv) + h * h + (3 if m.mlp == "swiglu" else 2) * h * f
    biases = {"all": (h + 2 * kv) + h + (2 if m.mlp == "swiglu" else 1) * f + h, "qkv": h + 2 * kv, "none": 0}
    positions = m.seq_length * h if m.position_embedding == "learned_absolute" else 0
    return (m.num_layers * (weights + biases[m.linear_bias] + 2 * norm) + norm + positions
            + (2 if m.untie_embeddings else 1) * h * vocab_size)


def model_flops(cfg: Config, *, vocab_size: int, positions: int, width_sum: int) -> float:
    """Training FLOPs of `positions` token positions in sequences of any widths; `width_sum` sums, over the
    positions, the width of each one's sequence (a [b, s] microbatch adds b*s positions and b*s*s). The count
    is linear in the width (the attention term), so this is `model_flops_per_token` summed position by position.
    """
    base = model_flops_per_token(cfg, vocab_size=vocab_size, seq_length=0)
    per_width = model_flops_per_token(cfg, vocab_size=vocab_size, seq_length=1) - base
    return base * positions + per_width * width_sum


MEASURED_RATES = os.path.join(os.path.dirname(__file__), "measured_rates.json")


def measured_rates(path: str = MEASURED_RATES) -> dict:
    """What `benchmarks/bench_eval_batch.py --write-rates` measured on the built-in task rows: per task, the
    positions finetuning computes per example (padded to each microbatch's longest) and evaluation's requests
    per document and positions per request; the dry-run's basis for finetuning and evaluation hours. No file:
    {} (the dry-run falls back to padding and says so, `recipe._rates_basis`)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def memory_gb(cuda: bool) -> float:
    """Peak GPU memory allocated by this rank, or this process's resident memory on a CPU."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
