"""Which fused kernels and which layer spec a run uses, decided in one place from what is actually present.

Each decision reads what is importable (apex, Transformer Engine, Megatron's compiled kernels) and whether
the run is on CUDA, never "CUDA is there" alone: a plain `pip install` on a GPU has neither apex nor TE nor
the compiled softmax, and each of those fusions then fails before the first step. `python -m
pause_megatron.kernels` prints every decision with its reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field

# Megatron-Core warns, at import and in every rank, each time one of its modules finds apex or Transformer
# Engine missing ("Apex is not installed. Falling back to Torch Norm", "Transformer Engine and Apex are not
# installed. Falling back to Torch optimizers", ...): a dozen lines per rank that say what `choose` decides
# anyway. They are dropped (pause_megatron/__init__.py calls this before anything imports megatron) and each
# job states its decisions once, on rank 0 (`summary`).
FALLBACK_WARNINGS = r"(Apex is not installed|Transformer Engine and Apex are not installed)"


def quiet_fallback_warnings() -> None:
    warnings.filterwarnings("ignore", message=FALLBACK_WARNINGS, category=UserWarning)


def use_cuda() -> bool:
    """A GPU run unless there is no GPU or PAUSE_MEGATRON_CPU=1 asks for the CPU (emulation)."""
    import torch

    return os.environ.get("PAUSE_MEGATRON_CPU", "0") != "1" and torch.cuda.is_available()


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


@dataclass(frozen=True)
class Present:
    """What is installed, found once per process; tests pass their own to simulate another machine."""

    cuda: bool
    apex: bool  # apex's fused LayerNorm (FusedLayerNorm, persistent kernel) and FusedAdam
    transformer_engine: bool
    grad_accum_kernel: bool  # fused_weight_gradient_mlp_cuda (apex), for Megatron's own linear layers

    @classmethod
    def detect(cls, *, cuda: bool) -> "Present":
        return cls(cuda=cuda, apex=importable("apex.contrib.layer_norm"), transformer_engine=importable(
            "transformer_engine.pytorch"), grad_accum_kernel=importable("fused_weight_gradient_mlp_cuda"))


@dataclass(frozen=True)
class Kernels:
    """The decisions, each with its reason (`reasons[name]`).

    Megatron's masked_softmax_fusion is not among them: only its DotProductAttention reads it, and neither spec
    runs that (the local spec's core attention is SDPAttention, the TE spec's is TE's), so it stays off."""

    spec: str  # "te" or "local"
    persist_layer_norm: bool
    gradient_accumulation_fusion: bool
    bias_activation_fusion: bool
    bias_dropout_fusion: bool
    apply_rope_fusion: bool
    sdpa_attention: bool  # the local spec's core attention on F.scaled_dot_product_attention
    reasons: dict = field(default_factory=dict, compare=False)

    def transformer_config_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ("persist_layer_norm", "gradient_accumulation_fusion",
                                              "bias_activation_fusion", "bias_dropout_fusion",
                                              "apply_rope_fusion")}


def choose(present: Present, *, spec: str = "auto", normalization: str = "LayerNorm") -> Kernels:
    """Decide every kernel for `present`, the requested `model.spec` ("auto", "te" or "local") and the
    model's `normalization` ("LayerNorm" or "RMSNorm")."""
    c, why = present.cuda, {}
    if spec == "te":
        if not (c and present.transformer_engine):
            raise ValueError("model.spec=te needs Transformer Engine and a GPU")
        te, why["spec"] = True, "asked for (model.spec=te)"
    elif spec == "local":
        te, why["spec"] = False, "asked for (model.spec=local)"
    else:
        te = c and present.transformer_engine
        why["spec"] = "auto: Transformer Engine on a GPU" if te else (
            "auto: no Transformer Engine" if c else "auto: no GPU")
    # Megatron's local spec builds apex's FusedLayerNorm for LayerNorm when apex is importable; for RMSNorm,
    # and without apex, torch's norm (WrappedTorchNorm), which refuses persist_layer_norm. TE's norms ignore it.
    persist = c and not te and present.apex and normalization == "LayerNorm"
    why["persist_layer_norm"] = ("apex FusedLayerNorm on a GPU" if persist
                                 else "needs apex, LayerNorm and the local spec on a GPU")
    # The output layer is Megatron's own ColumnParallelLinear in both specs, and it refuses the flag without
    # apex's kernel even where TE's linears would fuse on their own.
    grad_accum = c and present.grad_accum_kernel
    why["gradient_accumulation_fusion"] = ("fused_weight_gradient_mlp_cuda present" if grad_accum
                                           else "needs apex's fused_weight_gradient_mlp_cuda (output layer)")
    # Pure PyTorch (Megatron's jit_fuser = torch.compile): fine on CUDA, a slow C++ compile on the CPU.
    bias_fusions = c
    why["bias_activation_fusion"] = why["bias_dropout_fusion"] = (
        "torch.compile'd bias+GeLU / bias+dropout+add" if c else "off on the CPU (compile time, no gain)")
    rope = c and te
    why["apply_rope_fusion"] = "TE's fused RoPE" if rope else "needs Transformer Engine"
    sdpa = not te
    why["sdpa_attention"] = ("local spec: F.scaled_dot_product_attention (flash / memory-efficient kernels)"
                             if sdpa else "TE's own fused attention")
    return Kernels(spec="te" if te else "local", persist_layer_norm=persist,
                   gradient_accumulation_fusion=grad_accum, bias_activation_fusion=bias_fusions,
                   bias_dropout_fusion=bias_fusions, apply_rope_fusion=rope, sdpa_attention=sdpa, reasons=why)


def summary(k: Kernels, present: Present) -> str:
    """One line for a job's log: what is installed, and which kernels and fusions are on and off."""
    names = [n for n in k.reasons if n != "spec"]
    on = [n for n in names if getattr(k, n)]
    off = [n for n in names if not getattr(k, n)]
    have = ", ".join(f"{what} {'yes' if there else 'no'}" for what, there in (
        ("GPU", present.cuda), ("apex", present.apex), ("Transformer Engine", present.transformer_engine)))
    return (f"kernels: {k.spec} spec ({k.reasons['spec']}); {have}; on: {', '.join(on) or 'none'}; "
            f"off: {', '.join(off) or 'none'} (reasons: python -m pause_megatron.kernels)")


def describe(k: Kernels) -> str:
    """One line per decision: name, on/off, reason."""
    return "\n".join(f"{name:30s} {str(getattr(k, name)):5s} {reason}" for name, reason in k.reasons.items())


if __name__ == "__main__":
    cuda = use_cuda()
    present = Present.detect(cuda=cuda)
    print(present)
    print(describe(choose(present, normalization=sys.argv[1] if len(sys.argv) > 1 else "LayerNorm")))
