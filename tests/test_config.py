"""Typed config: presets, YAML + dotted overrides, and validation that names the field."""

import pytest

from pause_megatron.config import PRESETS, ConfigError, flat_dict, load_config, validate

from helpers import python


def test_defaults_take_the_tiny_preset():
    cfg = load_config()
    assert cfg.model.num_layers == PRESETS["tiny"]["num_layers"]


@pytest.mark.parametrize("preset,layers,hidden,heads,ffn", [("130m", 12, 768, 12, 3072), ("1b", 24, 2048, 32, 8192)])
def test_paper_presets(preset, layers, hidden, heads, ffn):
    m = load_config(None, [f"model.preset={preset}"]).model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.seq_length) == (
        layers, hidden, heads, ffn, 2048)


def test_yaml_then_overrides_win_over_preset(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  preset: 130m\n  num_layers: 6\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.steps=19", "parallel.tensor=2"])
    assert cfg.model.num_layers == 6 and cfg.model.hidden_size == 768
    assert cfg.train.steps == 19 and cfg.parallel.tensor == 2
    assert flat_dict(cfg)["model.hidden_size"] == 768


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["parallel.tensor=3"], "model.num_attention_heads=4 is not divisible by parallel.tensor=3"),
        (["parallel.pipeline=3"], "model.num_layers=4 is not divisible by parallel.pipeline=3"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], "parallel.virtual_pipeline=4"),
        (["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline needs parallel.pipeline > 1"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tensor > 1"),
        (["train.global_batch_size=7"], "train.global_batch_size=7 is not divisible by train.micro_batch_size=2"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.warmup_steps=50"], "optim.warmup_steps=50 must be less than train.steps"),
        (["pauses.ratio=1.2"], "pauses.ratio"),
        (["pauses.placement=middle"], "pauses.placement"),
        (["data.variant=both"], "data.variant"),
        (["model.preset=7b"], "model.preset: unknown preset '7b'"),
        (["model.hidden_size=65"], "model.hidden_size=65 is not divisible by model.num_attention_heads=4"),
        (["precision.dtype=fp16"], "precision.dtype"),
        (["model.nope=1"], "model.nope"),
        (["train.steps=many"], "train.steps"),
        (["trainsteps"], "'trainsteps' is not of the form key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert field in str(err.value)


@pytest.mark.parametrize(
    "overrides,field",
    [
        # Megatron takes any virtual size as "interleaved" and then fails inside the schedule.
        (["parallel.pipeline=2", "parallel.virtual_pipeline=1"], "parallel.virtual_pipeline must be >= 2"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=0"], "parallel.virtual_pipeline must be >= 2"),
        (["model.hidden_dropout=1.0"], "model.hidden_dropout must be in [0, 1)"),
        (["model.attention_dropout=-0.1"], "model.attention_dropout must be in [0, 1)"),
        (["model.make_vocab_size_divisible_by=0"], "model.make_vocab_size_divisible_by must be >= 1"),
        (["model.make_vocab_size_divisible_by=-128"], "model.make_vocab_size_divisible_by must be >= 1"),
        (["data.split=98;2;0"], "data.split must be"),
        (["data.split=98,2,0,1"], "data.split must be"),
        (["data.split=98,-2,0"], "data.split must be"),
        (["data.split=0,2,0"], "data.split must be"),
        (["data.split=abc"], "data.split must be"),
        (["train.eval_interval=5", "train.eval_steps=0"], "train.eval_steps must be >= 1 when train.eval_interval=5"),
    ],
)
def test_launch_failures_are_refused_by_field(overrides, field):
    """Each of these used to pass validation and fail only after the process group started (or silently)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert field in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["model.hidden_dropout=0.1", "model.attention_dropout=0.0"],
    ["data.split=100"], ["data.split=98,2"], ["data.split=949.5,50,0.5"],
    ["train.eval_interval=0", "train.eval_steps=0"],
    ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
])
def test_edges_that_megatron_accepts_pass(overrides):
    load_config(None, overrides)


def test_interleaved_pipeline_needs_a_multiple_of_pp_microbatches():
    """megatron-core's interleaved schedule groups microbatches by PP and refuses a partial last group."""
    vpp = ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.micro_batch_size=1"]
    with pytest.raises(ConfigError, match="multiple of parallel.pipeline=2, got 3"):
        load_config(None, [*vpp, "train.global_batch_size=3"], world_size=2)
    with pytest.raises(ConfigError, match="multiple of parallel.pipeline=2, got 1"):
        load_config(None, [*vpp, "train.global_batch_size=2"], world_size=4)  # DP 2: one microbatch each
    load_config(None, [*vpp, "train.global_batch_size=4"], world_size=4)
    load_config(None, [*vpp, "train.global_batch_size=3", "parallel.virtual_pipeline=null"], world_size=2)


def test_sequence_parallel_needs_the_transformer_engine_spec_and_tensor_parallelism(monkeypatch):
    """Megatron's local spec (CPU, or a GPU without TE) asserts at build time that torch LayerNorm has no SP."""
    from pause_megatron import config

    cfg = load_config(None, ["parallel.tensor=2"])
    cfg.parallel.sequence_parallel = True
    with pytest.raises(ConfigError, match="parallel.sequence_parallel needs the Transformer Engine layer spec"):
        validate(cfg, cuda=False)
    monkeypatch.setattr(config, "transformer_engine_available", lambda: False)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel needs the Transformer Engine layer spec"):
        validate(cfg, cuda=True)
    monkeypatch.setattr(config, "transformer_engine_available", lambda: True)
    validate(cfg, cuda=True)
    cfg.parallel.tensor = 1
    with pytest.raises(ConfigError, match="parallel.sequence_parallel needs parallel.tensor > 1"):
        validate(cfg, cuda=True)


def test_world_size_must_split_into_the_batch():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tensor x parallel.pipeline = 4"):
        load_config(None, ["parallel.tensor=2", "parallel.pipeline=2"], world_size=6)
    with pytest.raises(ConfigError, match="data-parallel size = 2 x 3"):
        load_config(None, ["train.global_batch_size=8"], world_size=3)
    load_config(None, ["parallel.tensor=2"], world_size=4)


def test_fp8_needs_a_gpu_and_transformer_engine():
    cfg = load_config(None, [])
    cfg.precision.fp8 = "hybrid"
    with pytest.raises(ConfigError, match="precision.fp8 needs a GPU"):
        validate(cfg, cuda=False)
    with pytest.raises(ConfigError, match="Transformer Engine"):
        validate(cfg, cuda=True)  # no TE on this machine


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


def test_bad_config_fails_before_any_process_group_starts(tmp_path):
    """The model CLI validates first: a bad preset exits non-zero with the field named, no traceback of gloo."""
    proc = python("-m", "pause_megatron.model", "7b", check=False, timeout=120)
    assert proc.returncode != 0
    assert "model.preset: unknown preset '7b'" in proc.stderr
    assert "init_process_group" not in proc.stderr
