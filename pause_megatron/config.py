"""Typed configuration: dataclasses with documented defaults, YAML recipe files and dotted overrides.

`load_config("recipes/x.yaml", ["model.preset=130m", "parallel.tensor=2"])` merges, in order: the dataclass
defaults, the model preset, the YAML file, the overrides; then `validate` checks every value before any
process group starts, naming the field of each problem. OmegaConf does the merging and type checking.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pause_megatron.pauses import PAPER_SEQ_LENGTH, PLACEMENTS, PRETRAIN_PAUSE_RATIO


PAUSE_SOURCES = ("offline", "online")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


# Llama-family architecture (RMSNorm, SwiGLU, grouped-query attention, no linear biases): the open models'
# settings that differ from the paper's GPT; each preset below sets its own shape on top.
_LLAMA = dict(normalization="RMSNorm", mlp="swiglu", linear_bias="none", untie_embeddings=False, seq_length=2048)

# Model presets. 130m and 1b are the paper's (Goyal et al., Section 4); tiny runs the whole stack on a CPU. The
# open models' presets reproduce the shapes of their published config.json (docs/pretraining.md lists the
# values); no weights come with them (import-hf brings those). seq_length is a training choice, not the model's
# max_position_embeddings.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, seq_length=128),
    "130m": dict(
        num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072, seq_length=PAPER_SEQ_LENGTH
    ),
    "1b": dict(
        num_layers=24, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=8192, seq_length=PAPER_SEQ_LENGTH
    ),
    "smollm2-135m": dict(_LLAMA, num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                         ffn_hidden_size=1536, rotary_base=100000, norm_epsilon=1e-5),
    "llama3.2-1b": dict(_LLAMA, num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                        ffn_hidden_size=8192, rotary_base=500000, norm_epsilon=1e-5, rope_scaling_factor=32.0),
    "qwen2.5-0.5b": dict(_LLAMA, num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2,
                         ffn_hidden_size=4864, rotary_base=1000000, norm_epsilon=1e-6, linear_bias="qkv"),
}
# The open models' vocabulary (their config.json's vocab_size): the recipes' --dry-run before the download.
OPEN_MODEL_VOCAB = {"smollm2-135m": 49152, "llama3.2-1b": 128256, "qwen2.5-0.5b": 151936}
LINEAR_BIASES = ("all", "none", "qkv")


@dataclass
class ModelConfig:
    """Decoder shape. Fields left None come from the preset."""

    preset: str = "tiny"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    seq_length: Optional[int] = None
    position_embedding: str = "rope"  # "rope" or "learned_absolute"; the paper does not say
    rotary_base: int = 10000
    normalization: str = "LayerNorm"  # or "RMSNorm"
    # MLP activation, the same function on CPU and GPU (model.gelu_kwargs): "tanh" is GELU's tanh approximation,
    # what Megatron's fused bias-GELU computes; "exact" (erf) turns that fusion off (for imported models)
    gelu: str = "tanh"
    untie_embeddings: bool = True  # separate output layer: 136M parameters at 130m, as in the paper
    # Llama-family settings (defaults: the paper's GPT). MLP "gelu" (model.gelu's function) or "swiglu" (a gated
    # linear unit: silu(gate) * up, Megatron's linear_fc1 holding [gate; up])
    mlp: str = "gelu"
    num_query_groups: Optional[int] = None  # key/value heads (grouped-query attention); None: one per head
    linear_bias: str = "all"  # biases of the linear layers: "all", "none" (Llama) or "qkv" (Qwen2: QKV only)
    # Llama 3.x's RoPE frequency scaling (factor; low/high frequency factors 1 and 4, original context 8192,
    # Megatron-Core's fixed values); None: no scaling
    rope_scaling_factor: Optional[float] = None
    norm_epsilon: float = 1e-5  # LayerNorm/RMSNorm epsilon
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128  # padded size independent of TP (see tokenizer.padded_vocab_size)
    spec: str = "auto"  # layer spec: "te" (Transformer Engine), "local" (Megatron-Core + SDPA) or "auto" (te if present)


# The model settings with which a checkpoint's weights compute what they were trained to compute: a run that
# starts from a checkpoint (train.init_from) must have the checkpoint's (checkpoint.check_init_from_model).
# seq_length is not one of them: with RoPE it is a training choice, and with learned absolute positions a
# different length is a table shape the load refuses.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "position_embedding", "rotary_base", "rope_scaling_factor", "normalization", "norm_epsilon",
                     "mlp", "gelu", "linear_bias", "untie_embeddings",
                     "make_vocab_size_divisible_by")  # the padded embedding rows (an imported Qwen2.5 keeps its own)


def _architecture(model: dict) -> dict:
    """`model`'s ARCHITECTURE_KEYS it records, in the form that compares: no query groups is one per head, and
    model.gelu means nothing under a SwiGLU MLP."""
    out = {k: model[k] for k in ARCHITECTURE_KEYS if k in model}
    if out.get("num_query_groups") is None and "num_attention_heads" in out:
        out["num_query_groups"] = out["num_attention_heads"]
    if out.get("mlp") == "swiglu":
        out.pop("gelu", None)
    return out


def architecture_differences(saved: dict, model: dict) -> list[str]:
    """The architecture keys on which a checkpoint's config.model (`saved`) and a run's (`model`) differ, as
    "model.KEY: checkpoint X, this run Y". A key the checkpoint does not record (saved before it existed) is not
    compared."""
    a, b = _architecture(saved), _architecture(model)
    return [f"model.{k}: checkpoint {a[k]!r}, this run {b.get(k)!r}" for k in a if a[k] != b.get(k)]


def model_overrides(model: dict, keys=("seq_length", *ARCHITECTURE_KEYS)) -> list[str]:
    """`model.KEY=VALUE` overrides that set `keys` of a config.model dict (those it records) on a run."""
    def text(value) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return [f"model.{k}={text(model[k])}" for k in keys if k in model]


@dataclass
class ParallelConfig:
    """Model parallelism. Data parallelism is what is left: world_size / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False


@dataclass
class PrecisionConfig:
    """Numerics. "auto" is fp32 on the CPU and bf16 on a GPU."""

    dtype: str = "auto"  # "auto", "fp32" or "bf16"
    fp8: Optional[str] = None  # None, "e4m3" or "hybrid" (Transformer Engine on a GPU only)
    fp8_recipe: str = "delayed"  # "delayed", "tensorwise", "mxfp8" or "blockwise"


@dataclass
class OptimConfig:
    """Adam with linear warmup and cosine decay; Megatron's distributed optimizer as an option."""

    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    warmup_steps: int = 2
    distributed: bool = False


@dataclass
class TrainConfig:
    """The loop: batch sizes in sequences, lengths in optimizer steps."""

    micro_batch_size: int = 2
    global_batch_size: int = 8
    steps: int = 20
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0  # 0: no validation
    eval_steps: int = 2
    save_interval: int = 0  # 0: save only at the end (and when stopped by SIGTERM/SIGUSR1)
    keep_checkpoints: int = 0  # keep the newest N checkpoints (older ones deleted once `latest` moved); 0: all
    output_dir: str = "runs/default"  # checkpoints/, metrics.jsonl and the dataset index cache go here
    init_from: Optional[str] = None  # a checkpoint whose weights (any TP/PP layout) start this run


@dataclass
class DataConfig:
    """Where the tokens come from."""

    path: Optional[str] = None  # a data-prep output directory (manifest.json + shards)
    variant: str = "pause"  # "pause" (PausePT) or "std" (StdPT)
    tokenizer: Optional[str] = None  # a .model, tokenizer.json or a directory (tokenizer.load); default: data.path's
    split: str = "98,2,0"  # train, validation, test weights, as Megatron's dataset builder takes them
    task_dir: Optional[str] = None  # finetuning/eval data offline: <task_dir>/<task>/{train,eval}.jsonl


@dataclass
class PausesConfig:
    """The pause rule's knobs (see pause_megatron.pauses)."""

    ratio: float = PRETRAIN_PAUSE_RATIO  # M_pt / seq_length of PausePT (data.variant=pause)
    # PausePT's windows: "offline" reads the pause shards of data prep (made at its --pause-ratio); "online"
    # reads the std shards and injects pauses at `ratio` as each window is read, with data prep's rule and seed
    # (the same windows the pause shards hold at that ratio). See docs/data.md.
    source: str = "offline"
    m_ft: int = 10
    m_inf: Optional[int] = None  # None: the same as m_ft
    placement: str = "append"
    filler: str = "."


@dataclass
class TrackingConfig:
    """MLflow on rank 0. Any tracking URI; a local SQLite store by default."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "pause-megatron"
    run_name: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pauses: PausesConfig = field(default_factory=PausesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: Optional[str] = None  # the downstream task of a finetuning run (see pause_megatron.tasks)


def load_config(path: Optional[str] = None, overrides: list[str] = (), *, world_size: Optional[int] = None,
                base: Optional[dict] = None, hardware: bool = True) -> Config:
    """Defaults < model preset < `base` (e.g. a checkpoint's config) < YAML file < overrides, validated.

    hardware=False: skip the checks of this machine (GPU, Transformer Engine), as a plan made on a login node
    for a GPU cluster must; the job checks them when it starts.
    """
    try:
        merged = OmegaConf.structured(Config)
        layers = [OmegaConf.create(base)] if base else []
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        preset = OmegaConf.merge(merged, *layers).model.preset
        if preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        # the preset's values are the model's defaults: any layer above (a checkpoint's config, the file, the
        # overrides) sets a field over them
        merged = OmegaConf.merge(merged, {"model": PRESETS[preset]}, *layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"config{where}: {exc.msg if hasattr(exc, 'msg') else exc} (key: {exc.full_key})") from None
    validate(cfg, world_size=world_size, cuda=None if hardware else True, hardware=hardware)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as a nested dict (for MLflow params and checkpoints)."""
    return dataclasses.asdict(cfg)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as dotted keys, e.g. {"model.num_layers": 12}."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", to_dict(cfg))
    return out


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolved_dtype(cfg: Config, *, cuda: bool) -> str:
    """fp32 or bf16: what "auto" means on this machine."""
    if cfg.precision.dtype == "auto":
        return "bf16" if cuda else "fp32"
    return cfg.precision.dtype


def validate(cfg: Config, *, world_size: Optional[int] = None, cuda: Optional[bool] = None,
             hardware: bool = True) -> None:
    """Raise ConfigError naming the first field that cannot work; `world_size` checks the batch split.

    hardware=False: no check of what this machine has (pass cuda=True to validate for a GPU cluster).
    """
    from pause_megatron.kernels import use_cuda

    cuda = use_cuda() if cuda is None else cuda
    m, p, pr, o, t, d, pa = cfg.model, cfg.parallel, cfg.precision, cfg.optim, cfg.train, cfg.data, cfg.pauses

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length"):
        need(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    need(m.hidden_size % m.num_attention_heads == 0,
         f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    need(m.position_embedding in ("rope", "learned_absolute"),
         f"model.position_embedding must be 'rope' or 'learned_absolute', got {m.position_embedding!r}")
    need(m.spec in ("auto", "te", "local"), f"model.spec must be 'auto', 'te' or 'local', got {m.spec!r}")
    if m.spec == "te":
        need(cuda and (not hardware or transformer_engine_available()),
             "model.spec=te needs Transformer Engine and a GPU")
    need(m.normalization in ("LayerNorm", "RMSNorm"),
         f"model.normalization must be 'LayerNorm' or 'RMSNorm', got {m.normalization!r}")

    need(m.gelu in ("tanh", "exact"), f"model.gelu must be 'tanh' or 'exact', got {m.gelu!r}")
    need(m.mlp in ("gelu", "swiglu"), f"model.mlp must be 'gelu' or 'swiglu', got {m.mlp!r}")
    need(m.linear_bias in LINEAR_BIASES, f"model.linear_bias must be one of {LINEAR_BIASES}, got {m.linear_bias!r}")
    need(m.norm_epsilon > 0, f"model.norm_epsilon must be positive, got {m.norm_epsilon}")
    need(m.rope_scaling_factor is None or (m.rope_scaling_factor >= 1 and m.position_embedding == "rope"),
         f"model.rope_scaling_factor={m.rope_scaling_factor} must be null or >= 1, with model.position_embedding=rope")
    groups = m.num_query_groups or m.num_attention_heads
    need(groups > 0 and m.num_attention_heads % groups == 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups={groups}")

    need(p.tensor >= 1, f"parallel.tensor must be >= 1, got {p.tensor}")
    need(p.pipeline >= 1, f"parallel.pipeline must be >= 1, got {p.pipeline}")
    need(m.num_attention_heads % p.tensor == 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={p.tensor}")
    need(groups % p.tensor == 0,
         f"model.num_query_groups={groups} is not divisible by parallel.tensor={p.tensor} (each tensor-parallel rank"
         " holds whole key/value heads)")
    need(m.ffn_hidden_size % p.tensor == 0,
         f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor={p.tensor}")
    chunks = p.pipeline * (p.virtual_pipeline or 1)
    need(m.num_layers % chunks == 0,
         f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}"
         + (f" x parallel.virtual_pipeline={p.virtual_pipeline}" if p.virtual_pipeline else ""))

    need(pr.dtype in ("auto", "fp32", "bf16"), f"precision.dtype must be 'auto', 'fp32' or 'bf16', got {pr.dtype!r}")
    need(pr.fp8 in (None, "e4m3", "hybrid"), f"precision.fp8 must be null, 'e4m3' or 'hybrid', got {pr.fp8!r}")
    need(pr.fp8_recipe in ("delayed", "tensorwise", "mxfp8", "blockwise"),
         f"precision.fp8_recipe must be delayed, tensorwise, mxfp8 or blockwise, got {pr.fp8_recipe!r}")
    if pr.fp8 is not None:
        need(cuda, "precision.fp8 needs a GPU: FP8 runs through Transformer Engine on CUDA only")
        need(not hardware or transformer_engine_available(),
             "precision.fp8 needs Transformer Engine (pip install 'pause-megatron[gpu]' or an NGC PyTorch container)")
        need(resolved_dtype(cfg, cuda=cuda) == "bf16", "precision.fp8 needs precision.dtype bf16 (or auto on a GPU)")
        need(m.spec != "local", "precision.fp8 needs the Transformer Engine spec, not model.spec=local")

    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr], got {o.min_lr}")
    need(o.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {o.clip_grad}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optim.adam_beta1 and optim.adam_beta2 must be in [0, 1)")

    need(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    need(t.global_batch_size % t.micro_batch_size == 0,
         f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}")
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(o.warmup_steps < t.steps, f"optim.warmup_steps={o.warmup_steps} must be less than train.steps={t.steps}")
    for name in ("log_interval", "eval_interval", "eval_steps", "save_interval"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    if world_size is not None:
        need(world_size % (p.tensor * p.pipeline) == 0,
             f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = {p.tensor * p.pipeline}")
        dp = world_size // (p.tensor * p.pipeline)
        need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x data-parallel"
             f" size = {t.micro_batch_size} x {dp}")

    need(d.variant in ("pause", "std"), f"data.variant must be 'pause' or 'std', got {d.variant!r}")
    need(0.0 <= pa.ratio < 1.0, f"pauses.ratio must be in [0, 1), got {pa.ratio}")
    need(pa.source in PAUSE_SOURCES, f"pauses.source must be one of {PAUSE_SOURCES}, got {pa.source!r}")
    # StdPT reads the std shards as they are; online injection is PausePT's: with variant=std it would be ignored.
    need(pa.source == "offline" or d.variant == "pause",
         f"pauses.source={pa.source} injects PausePT's pauses, but data.variant={d.variant} (StdPT) reads no pauses; "
         "set data.variant=pause or pauses.source=offline")
    need(pa.m_ft >= 0, f"pauses.m_ft must be >= 0, got {pa.m_ft}")
    need(pa.m_inf is None or pa.m_inf >= 0, f"pauses.m_inf must be >= 0, got {pa.m_inf}")
    need(pa.placement in PLACEMENTS, f"pauses.placement must be one of {PLACEMENTS}, got {pa.placement!r}")
    if cfg.task is not None:
        from pause_megatron.tasks import TASKS

        need(cfg.task in TASKS, f"task: unknown task {cfg.task!r}; the paper's tasks are {sorted(TASKS)}")
    _check_launch(cfg, world_size=world_size, cuda=cuda, need=need)


def _check_launch(cfg: Config, *, world_size: Optional[int], cuda: bool, need) -> None:
    """What Megatron or the data pipeline would refuse only after the process group has started, checked now.

    One check per field; the rules are megatron-core's (0.16.1 and 0.19 alike, cited where they live).
    """
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    for name in ("hidden_dropout", "attention_dropout"):
        need(0.0 <= getattr(m, name) < 1.0, f"model.{name} must be in [0, 1), got {getattr(m, name)}")
    need(m.make_vocab_size_divisible_by >= 1,
         f"model.make_vocab_size_divisible_by must be >= 1, got {m.make_vocab_size_divisible_by}")

    if p.virtual_pipeline is not None:
        # One chunk per stage is plain 1F1B, but Megatron takes any non-None size as "interleaved" and then
        # expects a list of chunks; 2+ chunks with no pipeline would run them on the no-pipelining schedule.
        need(p.virtual_pipeline >= 2,
             f"parallel.virtual_pipeline must be >= 2 (or null for plain 1F1B), got {p.virtual_pipeline}")
        need(p.pipeline > 1, "parallel.virtual_pipeline needs parallel.pipeline > 1")
        if world_size is not None and world_size % (p.tensor * p.pipeline) == 0:
            # schedules.forward_backward_pipelining_with_interleaving: microbatches come in groups of
            # microbatch_group_size_per_vp_stage (default: PP); the count must be >= PP and leave no partial
            # group smaller than PP, i.e. with the default a multiple of PP.
            dp = world_size // (p.tensor * p.pipeline)
            count = t.global_batch_size // max(t.micro_batch_size * dp, 1)
            need(count % p.pipeline == 0,
                 f"train.global_batch_size={t.global_batch_size}: interleaved pipelining needs a number of microbatches"
                 f" per step that is a multiple of parallel.pipeline={p.pipeline}, got {count} (global batch /"
                 f" (micro batch {t.micro_batch_size} x data-parallel {dp}))")
    need(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel needs parallel.tensor > 1")
    # model.layer_spec: without TE (the CPU, or a GPU without it) the local spec's torch LayerNorm asserts
    # "sequence parallel not supported by torch LayerNorm" while the model is built.
    need(not p.sequence_parallel or (cuda and transformer_engine_available()),
         "parallel.sequence_parallel needs the Transformer Engine layer spec (a GPU with Transformer Engine): the"
         " local spec's torch LayerNorm does not support sequence parallelism")

    parts = d.split.split(",")
    try:
        weights = [float(x) for x in parts]
    except ValueError:
        weights = []
    need(1 <= len(weights) <= 3 and all(w >= 0 for w in weights) and weights[0] > 0,
         f"data.split must be 1 to 3 comma-separated non-negative weights (train, validation, test) with a positive"
         f" train weight, e.g. '98,2,0'; got {d.split!r}")
    need(t.eval_interval == 0 or t.eval_steps >= 1,
         f"train.eval_steps must be >= 1 when train.eval_interval={t.eval_interval} (0 turns validation off)")
