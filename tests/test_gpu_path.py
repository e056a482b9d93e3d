"""The GPU path's decisions, built and stepped on the CPU: kernels from what is present, bf16 as Megatron trains it.

The three ways the first GPU run failed (persist_layer_norm without apex, bf16 weights without Float16Module,
masked_softmax_fusion without the compiled kernel) are built here with the flags a GPU without apex, TE or
compiled kernels gets, as are a GPU with TE but no apex and one with apex and RMSNorm; bf16 training resumes bit-identically from a checkpoint (dropout on, so the RNG state
matters) and decodes the same with and without the KV cache.
"""

import pytest

from helpers import ROOT, python, read_json, torchrun
from pause_megatron.config import ConfigError, load_config, validate
from pause_megatron.kernels import Present, choose

BARE_GPU = Present(cuda=True, apex=False, transformer_engine=False, grad_accum_kernel=False)


def test_bare_gpu_turns_off_what_needs_missing_kernels():
    k = choose(BARE_GPU)
    assert (k.spec, k.persist_layer_norm, k.gradient_accumulation_fusion) == ("local", False, False)
    assert "masked_softmax_fusion" not in k.transformer_config_kwargs()  # no spec runs DotProductAttention
    assert k.sdpa_attention and k.bias_activation_fusion and k.bias_dropout_fusion


def test_each_kernel_follows_what_is_present():
    import dataclasses

    full = dataclasses.replace(BARE_GPU, apex=True, grad_accum_kernel=True)
    k = choose(full)
    assert k.persist_layer_norm and k.gradient_accumulation_fusion
    # RMSNorm on the local spec is torch's norm even with apex; TE without apex's kernel has no fused
    # weight-gradient accumulation for Megatron's own output layer.
    assert not choose(full, normalization="RMSNorm").persist_layer_norm
    assert not choose(dataclasses.replace(BARE_GPU, transformer_engine=True)).gradient_accumulation_fusion
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
def test_bf16_trains_resumes_bit_identically_and_decodes(tmp_path, request, simulate_gpu):
    out = tmp_path / "out.json"
    extra = ["--simulate-gpu"]
    if not simulate_gpu:  # a bf16 pretrain of the real CLI, loaded through the evaluation entry point
        pt = tmp_path / "pt"
        torchrun("-m pause_megatron.pretrain", f"data.path={request.getfixturevalue('tiny_c4')}",
                 f"train.output_dir={pt}", "model.preset=tiny", "precision.dtype=bf16", "train.steps=4",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "tracking.enabled=false")
        extra = ["--eval-checkpoint", str(pt / "checkpoints")]
    torchrun(ROOT / "tests" / "dist" / "gpu_path.py", "--out", str(out), "--ckpt", str(tmp_path / "ckpt"),
             *extra, timeout=600, PYTHONPATH=f"{ROOT}:{ROOT / 'tests' / 'dist'}")
    r = read_json(out)
    if not simulate_gpu:
        e = r["eval"]
        assert (e["dtype"], e["wrapper"], e["param_dtypes"]) == ("bf16", "Float16Module", ["torch.bfloat16"])
        assert len(e["cached"]) == 8 and e["cached"] == e["recomputed"]
    if simulate_gpu:
        assert r["kernels"] == choose(BARE_GPU).transformer_config_kwargs()
    assert r["wrapper"] == "Float16Module"
    assert r["param_dtypes"] == ["torch.bfloat16"] and r["main_param_dtypes"] == ["torch.float32"]
    assert r["resumed"] == r["straight"]  # bit-identical
    assert r["straight"][-1] < r["straight"][0]
    assert r["cached"] == r["recomputed"]


@pytest.mark.slow
def test_te_without_apex_apex_with_rmsnorm_and_gelu_without_bias_build_and_step(tmp_path):
    out = tmp_path / "out.json"
    torchrun(ROOT / "tests" / "dist" / "kernel_builds.py", "--out", str(out), timeout=600,
             PYTHONPATH=f"{ROOT}:{ROOT / 'tests' / 'dist'}")
    r = read_json(out)
    assert r["te-without-apex"]["spec"] == "te"
    assert r["gelu-without-bias"]["kernels"]["bias_activation_fusion"]  # the machine's choice: on
    for case in ("te-without-apex", "apex-rmsnorm", "gelu-without-bias"):
        assert "error" not in r[case], r[case]
        assert r[case]["loss"] > 0


@pytest.mark.slow
def test_bench_gpu_frees_the_project_model_before_measuring_the_peer():
    # With the cycle collector off, only bench_gpu's own collection can free Megatron's DDP cycles; a model
    # left alive would count in the peer's peak memory.
    code = ("import gc, sys, weakref; sys.path.insert(0, 'benchmarks'); import bench_gpu\n"
            "from pause_megatron import runtime\nfrom pause_megatron.config import load_config\n"
            "from pause_megatron.model import unwrap\nfrom pause_megatron.train import build_train_state\n"
            "gc.disable()\n"
            "cfg = load_config(None, ['model.preset=tiny', 'precision.dtype=bf16'], world_size=1)\n"
            "runtime.init_distributed(cfg)\nstate = build_train_state(cfg, vocab_size=128, cuda=False)\n"
            "ref = weakref.ref(unwrap(state.model[0]))\ndel state\nruntime.destroy()\n"
            "bench_gpu._reset_memory(False)\nprint('alive' if ref() is not None else 'freed')")
    assert python("-c", code, timeout=300, PAUSE_MEGATRON_CPU="1").stdout.split()[-1] == "freed"
