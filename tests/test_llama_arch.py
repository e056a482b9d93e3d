"""Llama-family decoders (RMSNorm, SwiGLU, grouped-query attention, no / QKV biases, Llama 3 RoPE scaling, tied
embeddings): configuration, presets of the open models' shapes, and import/export checked against transformers'
own LlamaForCausalLM and Qwen2ForCausalLM (models this project did not write)."""

import json

import pytest

from helpers import ROOT, python, torchrun
from pause_megatron.config import ConfigError, load_config

# fp32 logits (size ~8) of 2-layer, 64-wide random models: transformers gives Megatron-Core's bit for bit here
# (difference 0.0: the same torch kernels on the same rows); 1e-4 leaves room for another BLAS, thread count or
# the fused-QKV matmul summing in another order (fp32 rounding over 2 layers of 64-128-wide sums is ~1e-6).
# Each broken property (RoPE scaling dropped, QKV biases zeroed, gate and up swapped) moves them by 1.3 to 10
# (`broken_diff`, asserted to be far above the tolerance so the comparison can tell).
LOGIT_ATOL = 1e-4
RTOL = 1e-5  # layouts differ in summation order only (tests/test_parallel.py)


# ---- configuration (no Megatron start-up) -----------------------------------------------------------------

def test_new_settings_at_their_defaults_are_the_papers_gpt():
    m = load_config(None, []).model
    assert (m.mlp, m.num_query_groups, m.linear_bias, m.rope_scaling_factor, m.norm_epsilon) == (
        "gelu", None, "all", None, 1e-5)


def test_a_preset_sets_architecture_and_a_later_layer_overrides_it():
    m = load_config(None, ["model.preset=qwen2.5-0.5b", "model.num_query_groups=7"]).model
    assert (m.normalization, m.mlp, m.linear_bias, m.untie_embeddings, m.num_query_groups) == (
        "RMSNorm", "swiglu", "qkv", False, 7)
    # a checkpoint's config (base) wins over the preset, as for the shape fields
    m = load_config(None, ["model.preset=llama3.2-1b"], base={"model": {"normalization": "LayerNorm"}}).model
    assert m.normalization == "LayerNorm" and m.rope_scaling_factor == 32.0


@pytest.mark.parametrize("overrides,field", [
    (["model.num_attention_heads=4", "model.num_query_groups=3"], "model.num_query_groups=3"),
    (["model.num_query_groups=1", "parallel.tensor=2"], "model.num_query_groups=1 is not divisible by parallel.tensor"),
    (["model.linear_bias=some"], "model.linear_bias"),
    (["model.mlp=relu"], "model.mlp"),
    (["model.rope_scaling_factor=0.5"], "model.rope_scaling_factor"),
    (["model.rope_scaling_factor=8", "model.position_embedding=learned_absolute"], "model.rope_scaling_factor"),
    (["model.norm_epsilon=0"], "model.norm_epsilon"),
])
def test_impossible_combinations_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


# Published config.json values (huggingface.co/{HuggingFaceTB/SmolLM2-135M, meta-llama/Llama-3.2-1B,
# Qwen/Qwen2.5-0.5B}) and parameter counts with each model's own vocabulary (already a multiple of 128, so padded
# and unpadded are the same; <pause> would add 128 padded rows).
OPEN_MODELS = {"smollm2-135m": (49152, 134_515_008), "qwen2.5-0.5b": (151936, 494_032_768),
               "llama3.2-1b": (128256, 1_235_814_400)}


@pytest.mark.slow
def test_presets_have_the_open_models_parameter_counts():
    code = ("import json, sys\nfrom pause_megatron.config import load_config\n"
            "from pause_megatron.model import preset_parameter_count\nout = {}\n"
            "for name, (vocab, _) in json.loads(sys.argv[1]).items():\n"
            "    out[name] = preset_parameter_count(load_config(None, [f'model.preset={name}']), vocab_size=vocab)\n"
            "print(json.dumps(out))")
    got = json.loads(python("-c", code, json.dumps(OPEN_MODELS), PAUSE_MEGATRON_CPU="1").stdout.splitlines()[-1])
    assert got == {name: count for name, (_, count) in OPEN_MODELS.items()}


# ---- import / export against transformers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tiny_c4, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    proc = python(str(ROOT / "tests" / "dist" / "llama_check.py"), "--tokenizer", str(tiny_c4 / "tokenizer.model"),
                  "--out", str(out))
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2", "smollm2"])
def test_import_computes_the_transformers_logits_and_export_gives_the_model_back(converted, kind):
    _, report = converted
    r = report[kind]
    assert r["max_abs_diff"] < LOGIT_ATOL, r
    assert r["broken_diff"] > 100 * LOGIT_ATOL, r  # the comparison tells the checked property apart
    assert r["same_names"] and r["unequal"] == [] and r["config_diff"] == {}, r
    m = r["config"]
    assert (m["normalization"], m["mlp"], m["position_embedding"]) == ("RMSNorm", "swiglu", "rope")
    assert (m["linear_bias"], m["untie_embeddings"], m["rope_scaling_factor"], m["num_query_groups"]) == {
        "llama": ("none", True, 32.0, 2), "qwen2": ("qkv", False, None, 2), "smollm2": ("none", False, None, 1)}[kind]


@pytest.mark.slow
def test_continued_pretraining_of_an_imported_llama_at_tp2_and_pp2_follows_the_single_process_curve(
        converted, tiny_c4, tmp_path):
    out, _ = converted
    ckpt = out / "llama-ckpt"
    shape = python("-c", "import sys; from pause_megatron.hf import checkpoint_model_overrides as o; "
                   "print(' '.join(o(sys.argv[1])))", str(ckpt)).stdout.split()
    curves = []
    for name, nproc, layout in (("single", 1, []), ("tp2", 2, ["parallel.tensor=2"]),
                                ("pp2", 2, ["parallel.pipeline=2"])):
        run = tmp_path / name
        torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={run}",
                 f"train.init_from={ckpt}", *shape, *layout, "train.steps=3", "optim.warmup_steps=1",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "tracking.enabled=false", nproc=nproc)
        rows = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows[r["step"]] = r
        curves.append([rows[s]["train/loss"] for s in (1, 2, 3)])
    assert curves[1] == pytest.approx(curves[0], rel=RTOL)
    assert curves[2] == pytest.approx(curves[0], rel=RTOL)


def test_training_flops_count_grouped_query_attention_and_swiglu():
    """Per token (no attention scores), 6 x the matmul weights: SmolLM2-135M's 30 layers of 3,538,944 linear
    weights (its 3,540,096 per layer less two 576-wide norms) and the 576 x 49,152 logits."""
    from pause_megatron.perf import model_flops_per_token

    cfg = load_config(None, ["model.preset=smollm2-135m"])
    assert model_flops_per_token(cfg, vocab_size=49152, seq_length=0) == 6 * (30 * 3_538_944 + 576 * 49152)


# ---- refusals, read without starting Megatron --------------------------------------------------------------

LLAMA_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=500, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=128, rms_norm_eps=1e-5, hidden_act="silu")


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling="),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling="),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
])
def test_llama_family_configs_ours_cannot_compute_are_refused_naming_the_key(tmp_path, change, message):
    from pause_megatron.hf import ConversionError, read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **change}))
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")) as exc:
        read_hf_config(str(tmp_path))
    assert "config.json" in str(exc.value)


def test_qkv_fusion_groups_each_query_groups_heads_with_its_key_and_value_and_import_refuses_spare_weights():
    import torch

    from pause_megatron.hf import ARCHITECTURES, ConversionError, fuse_qkv, split_qkv

    heads, groups, d = 4, 2, 3  # rows labelled by (projection, head): q 0..3, k 10..11, v 20..21
    q, k, v = (torch.arange(base, base + n).repeat_interleave(d)[:, None].float()
               for base, n in ((0, heads), (10, groups), (20, groups)))
    fused = fuse_qkv(q, k, v, groups=groups)
    assert fused[::d, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]  # Megatron's [q_g..., k_g, v_g] per group g
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)))
    # a weight the model would compute with but ours has no place for (a Llama o_proj bias) is not dropped
    llama = ARCHITECTURES["llama"]
    weights = {"model.norm.weight": torch.ones(4), "model.layers.0.self_attn.o_proj.bias": torch.ones(4)}
    with pytest.raises(ConversionError, match="o_proj.bias"):
        llama.from_hf(weights, LLAMA_CONFIG, {"decoder.final_layernorm.weight": torch.ones(4)}, "dir")


# ---- export to GPT-NeoX refuses what NeoX would drop (config only, no Megatron) ------------------------------

@pytest.mark.parametrize("overrides,field", [
    (["model.rope_scaling_factor=8"], "model.rope_scaling_factor=8.0"),
    (["model.linear_bias=qkv"], "model.linear_bias='qkv'"),
    (["model.num_query_groups=2"], "model.num_query_groups=2"),
    (["model.norm_epsilon=1e-6"], "model.norm_epsilon=1e-06"),
])
def test_export_of_a_gelu_model_as_gpt_neox_refuses_settings_neox_would_drop(overrides, field):
    from pause_megatron.hf import ConversionError, NeoX, exporter

    assert exporter(load_config(None, [])) is NeoX
    with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
        exporter(load_config(None, overrides))


# ---- continuing from a checkpoint with other model settings ------------------------------------------------

def test_architecture_differences_name_every_setting_that_changes_what_the_weights_compute():
    from pause_megatron.config import ARCHITECTURE_KEYS, ModelConfig, architecture_differences, model_overrides, \
        to_dict

    saved = to_dict(load_config(None, ["model.preset=qwen2.5-0.5b"]))["model"]  # a checkpoint's config.model
    same = to_dict(load_config(None, model_overrides(saved)))["model"]
    assert architecture_differences(saved, same) == []
    # a run without the printed overrides: the preset's shape, but every other setting at its default
    plain = to_dict(load_config(None, ["model.preset=qwen2.5-0.5b"], base={"model": {
        k: getattr(ModelConfig, k) for k in ("norm_epsilon", "rotary_base", "linear_bias", "num_query_groups")}}))
    diffs = architecture_differences(saved, plain["model"])
    assert diffs == ["model.num_query_groups: checkpoint 2, this run 14", "model.rotary_base: checkpoint 1000000, "
                     "this run 10000", "model.norm_epsilon: checkpoint 1e-06, this run 1e-05",
                     "model.linear_bias: checkpoint 'qkv', this run 'all'"]
    # every model setting is either architecture or named here as not (a new field must be placed)
    others = {"preset", "seq_length", "init_method_std", "hidden_dropout", "attention_dropout",
              "make_vocab_size_divisible_by", "spec"}
    assert set(ModelConfig.__dataclass_fields__) == set(ARCHITECTURE_KEYS) | others
    assert [o.split("=")[0] for o in model_overrides(saved)] == [f"model.{k}" for k in ("seq_length",
                                                                                         *ARCHITECTURE_KEYS)]
    # model.gelu means nothing under SwiGLU; no query groups is one per head
    assert architecture_differences({**saved, "gelu": "exact"}, same) == []
    assert architecture_differences({"num_attention_heads": 4, "num_query_groups": None},
                                    {"num_attention_heads": 4, "num_query_groups": 4}) == []


@pytest.mark.slow
def test_pretraining_from_a_checkpoint_with_other_model_settings_is_refused_before_a_checkpoint_is_written(
        pretrained, tiny_c4, tmp_path):
    run = tmp_path / "run"
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={run}",
                    f"train.init_from={pretrained}", "model.norm_epsilon=1e-6", "model.rotary_base=500",
                    "train.steps=2", "optim.warmup_steps=1", "tracking.enabled=false", check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]  # the rank exits 2
    assert "model.norm_epsilon: checkpoint 1e-05, this run 1e-06" in proc.stderr
    assert "model.rotary_base: checkpoint 10000, this run 500" in proc.stderr
    assert "model.rotary_base=10000 model.norm_epsilon=1e-05" in proc.stderr  # the remedy
    assert not (run / "checkpoints").exists()


def test_a_gelu_mlp_without_biases_is_the_same_function_with_the_fusion_a_gpu_turns_on():
    """Megatron fuses bias-GELU only with a bias (TransformerConfig refuses otherwise, built with a GPU's kernel
    choice in tests/test_gpu_path.py); without one the unfused tanh form is the fused kernel's function."""
    from pause_megatron.model import activation_kwargs, gelu_tanh

    for bias in ("none", "qkv"):
        m = load_config(None, [f"model.linear_bias={bias}"]).model
        assert activation_kwargs(m, fused=True) == {"activation_func": gelu_tanh, "bias_activation_fusion": False}
    m = load_config(None, []).model
    assert activation_kwargs(m, fused=True)["bias_activation_fusion"]


# ---- import-hf's reading of config.json and weights ---------------------------------------------------------

def test_import_reads_default_rope_as_none_caps_seq_length_and_refuses_a_wrong_qkv_shape(tmp_path):
    import torch

    from pause_megatron.hf import ARCHITECTURES, ConversionError, read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "max_position_embeddings": 131072,
                                                      "rope_scaling": {"rope_type": "default"}}))
    arch, c = read_hf_config(str(tmp_path))
    overrides = arch.overrides(c, None)
    assert "model.rope_scaling_factor=null" in overrides and "model.seq_length=2048" in overrides
    assert "model.seq_length=512" in arch.overrides(c, 512)
    # q has 3 heads' rows where the config says 4: a ConversionError naming it, not a reshape error
    head_dim, hidden = 16, 64
    weights = {"model.layers.0.self_attn.q_proj.weight": torch.ones(3 * head_dim, hidden),
               "model.layers.0.self_attn.k_proj.weight": torch.ones(2 * head_dim, hidden),
               "model.layers.0.self_attn.v_proj.weight": torch.ones(2 * head_dim, hidden)}
    params = {"decoder.layers.0.self_attention.linear_qkv.weight": torch.ones(8 * head_dim, hidden)}
    with pytest.raises(ConversionError, match=r"q_proj.weight has shape \(48, 64\), expected \(64, 64\)"):
        ARCHITECTURES["llama"].from_hf(weights, LLAMA_CONFIG, params, "dir")
