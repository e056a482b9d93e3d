"""The GPU path's decisions, built and stepped on the CPU: kernels from what is present, bf16 as Megatron trains it.

The three ways the first GPU run failed (persist_layer_norm without apex, bf16 weights without Float16Module,
masked_softmax_fusion without the compiled kernel) are built here with the flags a GPU without apex, TE or
compiled kernels gets; bf16 training resumes bit-identically from a checkpoint (dropout on, so the RNG state
matters) and decodes the same with and without the KV cache.
"""

import pytest

from helpers import ROOT, python, read_json, torchrun
from pause_megatron.config import ConfigError, load_config, validate
from pause_megatron.kernels import Present, choose

BARE_GPU = Present(cuda=True, apex=False, transformer_engine=False, softmax_kernel=False, grad_accum_kernel=False)


def test_bare_gpu_turns_off_what_needs_missing_kernels():
    k = choose(BARE_GPU)
    assert (k.spec, k.persist_layer_norm, k.masked_softmax_fusion, k.gradient_accumulation_fusion) == (
        "local", False, False, False)
    assert k.sdpa_attention and k.bias_activation_fusion and k.bias_dropout_fusion


def test_each_kernel_follows_what_is_present():
    import dataclasses

    full = dataclasses.replace(BARE_GPU, apex=True, softmax_kernel=True, grad_accum_kernel=True)
    k = choose(full)
    assert k.persist_layer_norm and k.masked_softmax_fusion and k.gradient_accumulation_fusion
    te = choose(dataclasses.replace(full, transformer_engine=True))
    assert te.spec == "te" and not te.sdpa_attention and te.apply_rope_fusion
    assert choose(dataclasses.replace(full, transformer_engine=True), spec="local").spec == "local"
    cpu = choose(dataclasses.replace(full, cuda=False))
    assert not any(cpu.transformer_config_kwargs().values())
    with pytest.raises(ValueError, match="Transformer Engine"):
        choose(BARE_GPU, spec="te")


def test_fp8_and_te_spec_refused_at_validation_with_the_reason():
    cfg = load_config(None, [])
    cfg.precision.fp8 = "hybrid"
    with pytest.raises(ConfigError, match="needs a GPU"):
        validate(cfg, cuda=False)
    with pytest.raises(ConfigError, match="Transformer Engine"):  # no TE on this machine
        validate(cfg, cuda=True)
    with pytest.raises(ConfigError, match="model.spec=te"):
        load_config(None, ["model.spec=te"])
    with pytest.raises(ConfigError, match="model.spec"):
        load_config(None, ["model.spec=fast"])


def test_cpu_emulation_hides_a_gpu_instead_of_raising():
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from pause_megatron import cpu_emulation, runtime; cpu_emulation.enable()\n"
            "assert not torch.cuda.is_available() and not runtime.use_cuda(); print('hidden')")
    assert "hidden" in python("-c", code, timeout=120).stdout


@pytest.mark.slow
@pytest.mark.parametrize("simulate_gpu", [False, True], ids=["bf16-cpu", "bf16-gpu-decisions"])
def test_bf16_trains_resumes_bit_identically_and_decodes(tmp_path, simulate_gpu):
    out = tmp_path / "out.json"
    torchrun(ROOT / "tests" / "dist" / "gpu_path.py", "--out", str(out), "--ckpt", str(tmp_path / "ckpt"),
             *(["--simulate-gpu"] if simulate_gpu else []), timeout=600,
             PYTHONPATH=f"{ROOT}:{ROOT / 'tests' / 'dist'}")
    r = read_json(out)
    if simulate_gpu:
        assert r["kernels"] == choose(BARE_GPU).transformer_config_kwargs()
    assert r["wrapper"] == "Float16Module"
    assert r["param_dtypes"] == ["torch.bfloat16"] and r["main_param_dtypes"] == ["torch.float32"]
    assert r["resumed"] == r["straight"]  # bit-identical
    assert r["straight"][-1] < r["straight"][0]
    assert r["cached"] == r["recomputed"]
