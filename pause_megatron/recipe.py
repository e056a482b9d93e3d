"""Recipes: the paper's experiments as one chain of stages — [import,] data, pretraining, finetuning, evaluation,
report.

`pause-megatron recipe run recipes/paper_1b.yaml [--dry-run] [key=value ...]`

A recipe names the variants (StdPT_StdFT, StdPT_PauseFT, PausePT_StdFT, PausePT_PauseFT), tasks, M_ft values,
seeds and ablations; `plan()` expands it into stages, each a command of this project's own CLIs (import-hf,
data_prep, pretrain, finetune, evaluate) with its output directory. With `init.hf_dir` (a local Hugging Face model
directory) the chain starts by importing that model: the data is tokenized with its tokenizer and both
pretrainings (StdPT, PausePT) continue from its weights. Running the recipe runs the stages in order, each as
an MLflow child run of one parent run. Stages run locally (torchrun) or are submitted to Slurm, one job per
stage with dependencies.

Reuse. A stage's identity is a hash of what decides its result: its kind, its resolved config (the YAML
file's contents and the overrides, as `load_config` merges them) without the settings that change only where
it is tracked and what it logs or checkpoints along the way (IGNORED: tracking.*, log/eval/save intervals;
the command line, with its run names and tags, is not hashed), the data it reads (the data stage's settings
and input files; without a data stage, the shards' manifest; the finetuning task files), and the identities
of the stages it depends on. The code version is not part of it. A stage whose marker (`stage.json` in its
output directory) records the same identity as finished is skipped; one that was interrupted (same
identity, not finished) resumes from its checkpoints; one whose identity changed starts afresh, and its old
output directory is kept as `<out>.replaced-<old identity>` (`.2`, `.3`, ... if that name is taken). An
output set aside earlier that finished with the identity now planned is put back instead of rerunning. A
subset of stages (`stages=[...]`) runs only when every stage it depends on, and does not run itself, has
finished (or can be put back so).

On Slurm (`_submit_all`, `pause_megatron.slurm`), a stage whose recorded job is still queued or running is
never resubmitted or set aside; a failed stage cancels its dependents, and running the recipe again submits
only what has not finished and is not in the queue.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pause_megatron.config import ConfigError, TrackingConfig, flat_dict, load_config
from pause_megatron.pauses import PAPER_M_FT, num_pretrain_pauses
from pause_megatron.tasks import TASKS

VARIANTS = ("StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT")
STAGES = ("import", "data", "pretrain", "finetune", "evaluate", "report")
GPU_STAGES = ("pretrain", "finetune", "evaluate")  # Megatron ranks, one per GPU
MARKER = "stage.json"
RESULT = "result.json"  # an evaluate stage's scores (the report's fallback when MLflow has none)
ASSUMED_MFU = 0.40  # for --dry-run time estimates: Megatron-LM's published figure at 1-2B on H100
CHECKPOINT_BYTES_PER_PARAM = 16  # --dry-run disk: fp32 weights and main params' Adam moments (+ bf16 copy), roughly
H100_BF16_TFLOPS = 989.4
DEFAULT_VOCAB = 32128  # the dry-run's vocabulary without init: the default 32,000 pieces and <pause>, padded
# --dry-run: stage kinds whose hours count FLOPs alone where other costs dominate (`print_plan`'s hours line)
LOWER_BOUND_STAGES = ("finetune", "evaluate")


@dataclass
class DataSpec:
    path: str = "data/c4"  # shards (data_prep output); built by the data stage when `input` is set
    input: Optional[str] = None  # C4 json.gz dir/glob, or "sample" for the generated built-in corpus
    sample_files: int = 2
    sample_docs_per_file: int = 300
    seq_length: int = 2048
    vocab_size: int = 32000
    workers: int = 2  # also the data job's CPUs on Slurm
    time: str = "24:00:00"  # the data job's time limit on Slurm


@dataclass
class InitSpec:
    # A local Hugging Face model directory (config.json, safetensors, tokenizer): imported by an `import` stage
    # (`pause-megatron import-hf`, on the CPU); the data stage tokenizes with its tokenizer and both pretrainings
    # start from its weights, with its architecture (read from config.json when the recipe is planned) and
    # model.seq_length = data.seq_length. None: pretraining starts from random weights.
    hf_dir: Optional[str] = None
    time: str = "02:00:00"  # the import job's time limit on Slurm


@dataclass
class StageSpec:
    config: Optional[str] = None  # a recipe file of pretrain/finetune (see recipes/)
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1  # Slurm executor: nodes x gpus_per_node ranks for this stage
    time: str = "04:00:00"


@dataclass
class FinetuneSpec(StageSpec):
    tasks: list[str] = field(default_factory=lambda: sorted(TASKS))
    m_ft: list[int] = field(default_factory=lambda: list(PAPER_M_FT))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    task_dir: Optional[str] = None  # offline task data (<dir>/<task>/{train,eval}.jsonl); None: the hub


@dataclass
class EvaluateSpec:
    limit: Optional[int] = None  # documents per task (None: the whole evaluation split)
    batch_size: str = "auto"  # requests per forward pass: N or auto (`evaluate --batch-size`; answers do not change)
    nodes: int = 1
    time: str = "01:00:00"


@dataclass
class AblationSpec:
    m_inf: list[int] = field(default_factory=list)  # M_inf robustness: evaluate PauseFT models at these M_inf
    m_inf_variants: list[str] = field(default_factory=lambda: ["PausePT_PauseFT", "StdPT_PauseFT"])
    prepend: bool = False  # PausePT with prepended pauses (finetune + evaluate), against appending
    filler: list[int] = field(default_factory=list)  # '.' x M at inference on StdPT_StdFT
    # PausePT pretrained at these pause ratios too (pauses.source=online: one data prep serves them all), each
    # finetuned and evaluated as the PausePT variants are. The main runs are the sweep's other points (StdPT at 0,
    # PausePT at its pauses.ratio): a ratio with their M_pt, or another listed ratio's, is refused.
    pause_ratio: list[float] = field(default_factory=list)


@dataclass
class LaunchSpec:
    executor: str = "local"  # "local" (torchrun here) or "slurm" (sbatch, one job per stage)
    nproc: int = 1  # local: ranks per stage; slurm with gpus_per_node 0: ranks per node
    gpus_per_node: int = 8  # slurm: GPUs (one rank each) per node of a training/evaluation stage; 0: the CPU
    cpus_per_task: int = 8  # slurm: CPUs per rank of a training/evaluation stage
    signal: str = "USR1@300"  # slurm: warn a training job this long before its limit (it saves, requeues)
    max_jobs: int = 500  # slurm: submit while fewer of your jobs are queued (MaxSubmitJobs); run again for the rest
    max_requeues: int = 3  # slurm: requeues in a row after a stop that saved no progress (then the job fails)
    sbatch_args: list[str] = field(default_factory=list)  # e.g. ["--partition=gpu", "--account=x"]
    python: Optional[str] = None  # the Python to run stages with (default: this one)


@dataclass
class Recipe:
    name: str = "recipe"
    output_dir: str = "runs/recipe"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    init: InitSpec = field(default_factory=InitSpec)
    data: DataSpec = field(default_factory=DataSpec)
    pretrain: StageSpec = field(default_factory=lambda: StageSpec(config="recipes/pretrain_1b_pause.yaml"))
    finetune: FinetuneSpec = field(default_factory=lambda: FinetuneSpec(config="recipes/finetune.yaml"))
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    ablations: AblationSpec = field(default_factory=AblationSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class Stage:
    """One step of the plan: a command, where it writes, what it waits for, and labels for the report."""

    key: str
    kind: str  # one of STAGES
    argv: list[str]  # the command (module and arguments, without the launcher)
    out: str
    deps: list[str]
    nodes: int = 1
    time: str = "01:00:00"
    tags: dict = field(default_factory=dict)
    estimate_s: Optional[float] = None
    disk_bytes: Optional[tuple[float, float]] = None  # --dry-run: checkpoints kept at the end, and at the peak
    inputs: dict = field(default_factory=dict)  # what decides the result (resolved config, data, ...)
    identity: str = ""  # set by plan(): inputs and the dependencies' identities, hashed


# Config keys that do not change a stage's result: where its run is tracked, and what it logs or checkpoints
# along the way (validation only measures: the model is in eval mode and draws no random numbers; checkpoints
# are written, never read back, by an uninterrupted run). train.output_dir is the stage's own place.
# train.init_from is a pretraining stage's output path: its identity, a dependency's, stands for it.
IGNORED = ("tracking.", "train.log_interval", "train.eval_interval", "train.eval_steps", "train.save_interval",
           "train.keep_checkpoints", "train.output_dir", "train.init_from")
SMALL_FILE = 64 << 20  # task files up to this size are hashed by content, larger ones by name, size and mtime


def _identity(stage: Stage, deps: list[Stage]) -> str:
    payload = {"kind": stage.kind, "inputs": stage.inputs, "deps": {d.key: d.identity for d in deps}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys added after runs were made, at the value that does what those runs did: left out of the identity at that
# value, so that adding them sets no finished stage aside. model.gelu "tanh" is what GPU runs always computed
# (Megatron's fused bias-GELU); CPU runs computed exact GELU before, tiny runs whose rerun costs little.
NEW_AT_OLD_BEHAVIOUR = {"pauses.source": "offline", "model.gelu": "tanh", "model.mlp": "gelu",
                        "model.num_query_groups": None, "model.linear_bias": "all",
                        "model.rope_scaling_factor": None, "model.norm_epsilon": 1e-5}


def _config_inputs(cfg) -> dict:
    """The resolved config as dotted keys, without IGNORED ones (nor NEW_AT_OLD_BEHAVIOUR ones at that value)."""
    return {k: v for k, v in flat_dict(cfg).items()
            if not k.startswith(IGNORED) and NEW_AT_OLD_BEHAVIOUR.get(k, object()) != v}


def _manifest_inputs(path: Optional[str]) -> Optional[dict]:
    """What decides the shards under `path` (their settings, tokenizer checksum and totals), or None before
    they exist."""
    from data_prep import manifest as mf

    file = os.path.join(path or "", mf.MANIFEST)
    if not path or not os.path.exists(file):
        return None
    m = mf.read_json(file)
    # the tokenizer's ids are left to its checksum, which decides them: stages done before they were recorded stay done
    keys = [k for k in mf.CONFIG_KEYS if k not in mf.TOKENIZER_IDS]
    return {**{k: m.get(k) for k in keys}, "complete": m.get("complete"), "totals": m.get("totals")}


def _task_files(task_dir: Optional[str], task: str) -> Optional[list]:
    """A task's offline files: name and content hash (name, size and mtime for files over SMALL_FILE)."""
    if not task_dir:
        return None
    root = os.path.join(task_dir, task)
    if not os.path.isdir(root):
        return []
    files = []
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name)
        if not os.path.isfile(p):
            continue
        st = os.stat(p)
        if st.st_size <= SMALL_FILE:
            with open(p, "rb") as fh:
                files.append((name, hashlib.sha256(fh.read()).hexdigest()))
        else:
            files.append((name, st.st_size, st.st_mtime_ns))
    return files


# ---- init: continued pretraining of a Hugging Face model ---------------------------------------------------

IMPORT_KEY = "import"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
NOT_READ = (".md", ".gitattributes")  # model cards and git metadata: no part of the import's result
HASH_CHUNK = 16 << 20
_HASHES: dict = {}  # (path, size, mtime_ns) -> sha256: one plan hashes each weight file once


def hf_dir_problem(r: Recipe) -> Optional[str]:
    """Why init.hf_dir cannot be imported as it stands (no such directory, no config.json), or None."""
    d = r.init.hf_dir
    if d and not os.path.exists(os.path.join(d, "config.json")):
        return (f"init.hf_dir: {d} is not a Hugging Face model directory (no config.json); download the model "
                f"there first (e.g. `huggingface-cli download <repo> --local-dir {d}`)")
    return None


def missing_inputs(r: Recipe) -> list[str]:
    """What the recipe reads from disk and does not find: the model to import, the data stage's input files.

    `--dry-run` plans without them (a plan made before the downloads; its identities change once they are
    there); `recipe run` refuses before anything runs (cli).
    """
    lines = [hf_dir_problem(r)] if hf_dir_problem(r) else []
    if r.data.input and r.data.input != "sample":
        from data_prep.c4_input import list_inputs

        try:
            list_inputs(r.data.input)
        except FileNotFoundError as exc:
            lines.append(f"data.input: {exc}")
    return lines


def _sha256(path: str) -> str:
    """A file's sha256, streamed (a 1B model's 2.5 GB in seconds), once per plan for an unchanged file."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _hf_dir_inputs(hf_dir: str) -> dict:
    """What decides the import's result: every file the import may read (config.json, tokenizer, weights) by
    content, so a byte-identical copy or re-download keeps the identity and a changed byte changes it; hidden
    entries (huggingface-cli's .cache), sub-folders and model cards are not read by the import."""
    if not os.path.isdir(hf_dir):
        return {"missing": hf_dir}
    files = []
    for name in sorted(os.listdir(hf_dir)):
        p = os.path.join(hf_dir, name)
        if name.startswith(".") or name.endswith(NOT_READ) or not os.path.isfile(p):
            continue
        files.append((name, _sha256(p)))
    return {"files": files}


def _hf_model(r: Recipe) -> tuple[list[str], int]:
    """The imported model's model.* overrides (`hf.hf_model_overrides`: the ones import-hf gives the checkpoint
    it writes, read from config.json when the recipe is planned, before the import has run) and its padded
    vocabulary (`hf.import_vocab_size`). Before the download: seq_length only and the vocabulary of the
    pretrain config's preset (`config.OPEN_MODEL_VOCAB`; else the default tokenizer's)."""
    from pause_megatron import hf

    if hf_dir_problem(r) is None:
        try:
            return (hf.hf_model_overrides(r.init.hf_dir, r.data.seq_length),
                    hf.import_vocab_size(r.init.hf_dir))
        except hf.ConversionError as exc:
            raise ConfigError(f"init.hf_dir: {exc}") from None
    from pause_megatron.config import OPEN_MODEL_VOCAB
    from pause_megatron.tokenizer import padded_vocab_size

    preset = load_config(r.pretrain.config, list(r.pretrain.overrides), hardware=False).model.preset
    vocab = OPEN_MODEL_VOCAB.get(preset)
    return [f"model.seq_length={r.data.seq_length}"], padded_vocab_size(vocab + 1) if vocab else DEFAULT_VOCAB


def import_root(r: Recipe) -> str:
    """The checkpoint root the import stage writes (train.init_from of both pretrainings)."""
    return f"{r.output_dir}/{IMPORT_KEY}/checkpoints"


def import_tokenizer(r: Recipe) -> str:
    """Where the import stores its tokenizer (the checkpoint root, holding tokenizer.model or tokenizer.json),
    which the data stage tokenizes with (`build_c4 --tokenizer` takes the folder): data and model share one
    tokenizer, and pretraining checks its identity against both."""
    return import_root(r)


def import_problem(root: str, hf_dir: str, seq_length: int, tokenizer: str) -> Optional[str]:
    """Why the checkpoint root at `root` is not a finished import of `hf_dir` at `seq_length`, or None: its
    `latest` must name a complete checkpoint (COMPLETE marker) recording that source and seq_length, and the
    tokenizer stored with it (`tokenizer`: a file, or the folder holding it) must be the one it records."""
    from pause_megatron import checkpoint

    latest = os.path.join(root, checkpoint.LATEST)
    if not os.path.exists(latest):
        return f"{root} has no `{checkpoint.LATEST}`"
    with open(latest) as fh:
        it = os.path.join(root, fh.read().strip())
    if not os.path.exists(os.path.join(it, checkpoint.COMPLETE)):
        return f"{it} is not complete"
    try:
        extra = checkpoint.read_extra(root)
    except Exception as exc:  # unreadable: not the import's output, whatever the error
        return f"{root}: {exc}"
    got = (extra.get("source"), (extra.get("config") or {}).get("model", {}).get("seq_length"))
    if got != (os.path.abspath(hf_dir), seq_length):
        return f"{root} was imported from {got[0]} at seq_length {got[1]}, not {os.path.abspath(hf_dir)} at {seq_length}"
    from pause_megatron import tokenizer as tokenizers

    path = tokenizers.tokenizer_file(tokenizer)
    try:
        checksum = tokenizers.load(path).checksum if path else None
    except ValueError:  # unreadable (tokenizers.UnreadableTokenizer is one): not the tokenizer it records
        checksum = None
    if checksum is None or checksum != extra.get("tokenizer_sha256"):
        return f"{path or tokenizer} is not the tokenizer {root} records"
    return None


def prepare_import(root: str, hf_dir: str, seq_length: int, tokenizer: str, *, log=print) -> bool:
    """Before the import runs (locally, or in its Slurm job, which may be a requeue): True if `root` already
    holds this import finished (import-hf renames it into place whole as its last act: a run stopped before
    its stage was marked, and import-hf would refuse to write over it); otherwise anything at `root` is set
    aside (kept, never reused) and False: import."""
    if not os.path.lexists(root):
        return False
    why = import_problem(root, hf_dir, seq_length, tokenizer)
    if why is None:
        return True
    aside, n = f"{root}.replaced", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{root}.replaced.{n}"
    os.rename(root, aside)
    log(f"  {why}: set aside as {aside}; importing again")
    return False


def import_memory_gb(hf_dir: Optional[str]) -> int:
    """The import job's memory (GB): the weight files' size (bf16 on disk, usually) as fp32 tensors read,
    the model built and its state saved, about 3 x fp32, plus 8 GB for Python, torch and Megatron."""
    if not hf_dir or not os.path.isdir(hf_dir):
        return 16
    size = sum(os.path.getsize(os.path.join(hf_dir, n)) for n in os.listdir(hf_dir) if n.endswith(WEIGHT_SUFFIXES))
    return 8 + -(-3 * 2 * size // 10**9)  # bf16 -> fp32: x2 bytes


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    """The recipe file with dotted overrides, checked: unknown stages, variants or tasks fail here."""
    if not os.path.exists(path):
        raise ConfigError(f"recipe not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        recipe: Recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc.msg if hasattr(exc, 'msg') else exc} (key: {exc.full_key})") from None
    for name in recipe.stages:
        if name not in STAGES:
            raise ConfigError(f"{path}: stages: unknown stage {name!r}; expected some of {list(STAGES)}")
    for name in [*recipe.variants, *recipe.ablations.m_inf_variants]:
        if name not in VARIANTS:
            raise ConfigError(f"{path}: unknown variant {name!r}; expected some of {list(VARIANTS)}")
    for name in recipe.finetune.tasks:
        if name not in TASKS:
            raise ConfigError(f"{path}: finetune.tasks: unknown task {name!r}; the paper's tasks are {sorted(TASKS)}")
    if recipe.ablations.prepend and "PausePT_PauseFT" not in recipe.variants:
        raise ConfigError(f"{path}: ablations.prepend compares prepended with appended pauses of PausePT_PauseFT; "
                          f"add PausePT_PauseFT to variants (now {recipe.variants})")
    keys: dict[str, float] = {}
    for ratio in recipe.ablations.pause_ratio:
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"{path}: ablations.pause_ratio: every ratio must be in [0, 1), got {ratio}")
        if f"{ratio:g}" in keys:  # the stage key pretrain/pause-r<ratio:g> names one run
            raise ConfigError(f"{path}: ablations.pause_ratio: {keys[f'{ratio:g}']} and {ratio} are one run "
                              f"(pretrain/pause-r{ratio:g}); list each ratio once")
        keys[f"{ratio:g}"] = ratio
    if recipe.ablations.pause_ratio and not any(v.startswith("PausePT_") for v in recipe.variants):
        raise ConfigError(f"{path}: ablations.pause_ratio finetunes each ratio as the PausePT variants are; add "
                          f"PausePT_PauseFT or PausePT_StdFT to variants (now {recipe.variants})")
    from pause_megatron.decoding import parse_batch_size

    try:
        parse_batch_size(recipe.evaluate.batch_size)
    except ValueError as exc:
        raise ConfigError(f"{path}: evaluate.batch_size: {exc}") from None
    data_dir = os.path.normpath(f"{recipe.output_dir}/data")
    if recipe.init.hf_dir and recipe.data.input and not os.path.normpath(recipe.data.path).startswith(data_dir + os.sep):
        raise ConfigError(f"{path}: data.path {recipe.data.path} is outside {data_dir}: with init.hf_dir the shards "
                          f"are made with the imported model's tokenizer, so they must live in the data stage's "
                          f"folder (e.g. data.path: {data_dir}/c4_{recipe.data.seq_length}), which a new model sets "
                          "aside whole, old shards included, before building its own")
    if recipe.launch.executor not in ("local", "slurm"):
        raise ConfigError(f"{path}: launch.executor must be 'local' or 'slurm', got {recipe.launch.executor!r}")
    return recipe


# ---- the plan --------------------------------------------------------------------------------------------

def _tracking_overrides(r: Recipe) -> list[str]:
    return [f"tracking.uri={r.tracking.uri}", f"tracking.experiment={r.tracking.experiment}",
            f"tracking.enabled={str(r.tracking.enabled).lower()}"]


def _run_name(key: str) -> str:
    """Every stage's MLflow run is named after its key (last: a config file's run_name fits one variant only)."""
    return f"tracking.run_name={key}"


def _resolve(config: Optional[str], overrides: list[str], gpus: int, *, model: Optional[dict] = None):
    """The stage's config as its job will see it, validated for its world size (nodes x ranks per node).

    No hardware checks: a plan made on a CPU login node for a GPU cluster must pass (the job checks its
    hardware when it starts). `model`: the pretrained shape a finetune stage trains.
    """
    where = config or "(defaults)"
    try:
        return load_config(config, overrides, world_size=gpus, base={"model": model} if model else None,
                           hardware=False)
    except ConfigError as exc:
        raise ConfigError(f"{where} with {gpus} ranks: {exc}") from None


def _estimate(cfg, gpus: int, width: Optional[float] = None, *, vocab: int) -> float:
    """Seconds for a training stage at ASSUMED_MFU on H100s, each sequence `width` positions (default: the
    config's seq_length; finetuning: the measured positions per example, `_finetune_estimate`)."""
    from pause_megatron.perf import model_flops_per_token

    width = cfg.model.seq_length if width is None else width
    tokens = cfg.train.steps * cfg.train.global_batch_size * width
    flops = model_flops_per_token(cfg, vocab_size=vocab, seq_length=width) * tokens
    return flops / (gpus * H100_BF16_TFLOPS * 1e12 * ASSUMED_MFU)


def _finetune_estimate(cfg, gpus: int, task: str, rates: dict, *, vocab: int) -> float:
    """A finetuning stage: its steps x global batch x the positions finetuning computes per example of this
    task (padded to each microbatch's longest; measured on the built-in rows at the rates file's M_ft,
    `perf.measured_rates`), moved by this stage's M_ft less the measured one (every example holds M_ft
    pauses; none with placement none), at most seq_length, at ASSUMED_MFU. A task the file lacks (or no file):
    seq_length per example (`_rates_basis` names it). A lower bound: see `print_plan`."""
    ft = rates.get("finetune", {})
    measured = ft.get("positions_per_example", {}).get(task)
    if measured is None:
        return _estimate(cfg, gpus, vocab=vocab)
    m = cfg.pauses.m_ft if cfg.pauses.placement != "none" else 0
    return _estimate(cfg, gpus, min(cfg.model.seq_length, max(1.0, measured - ft["m_ft"] + m)), vocab=vocab)


def _eval_estimate(cfg, gpus: int, task: str, documents: int, rates: dict, *, m_inf: int, placement: str,
                   vocab: int) -> float:
    """An evaluation stage: documents x lm-eval's requests per document x positions per request (measured on the
    built-in rows at the rates file's M_inf, moved by this stage's M_inf less that one: pauses or filler, none
    with placement none; generation counts max_gen_toks, an upper bound on the tokens it decodes) x forward
    FLOPs (a third of training's), at ASSUMED_MFU. On a GPU (the TE spec) every request computes its context
    itself (`decoding.shares_contexts`). A task the file lacks (or no file): one request of seq_length per
    document. A lower bound: see `print_plan`."""
    from pause_megatron.perf import model_flops_per_token

    ev = rates.get("evaluate", {})
    measured = ev.get("tasks", {}).get(task)
    if measured is None:
        requests, width = 1.0, float(cfg.model.seq_length)
    else:
        m = m_inf if placement != "none" else 0
        requests = measured["requests_per_doc"]
        width = min(cfg.model.seq_length, max(1.0, measured["positions_per_request"] - ev["m_inf"] + m))
    flops = documents * requests * width * model_flops_per_token(cfg, vocab_size=vocab, seq_length=width) / 3
    return flops / (gpus * H100_BF16_TFLOPS * 1e12 * ASSUMED_MFU)


def _rates_basis(rates: dict, tasks: set[str]) -> str:
    """The dry-run's words for where the finetuning and evaluation figures come from, naming what fell back."""
    if not rates:
        return ("no measured task figures (pause_megatron/measured_rates.json missing): finetuning counts "
                "seq_length per example, evaluation one request of seq_length per document (padding)")
    ft, ev = rates.get("finetune", {}), rates.get("evaluate", {})
    gen = ev.get("max_gen_toks", {})
    words = (f"per-task figures measured on CPU on the built-in task rows by {rates['measured_by']} "
             f"({rates['measured_on']}; {rates['tokenizer']}; finetuning at M_ft {ft.get('m_ft')}, micro batch "
             f"{ft.get('micro_batch_size')}, seq {ft.get('seq_length')}; evaluation at M_inf {ev.get('m_inf')}, "
             f"max_gen_toks {', '.join(f'{t} {n}' for t, n in sorted(gen.items())) or 'not recorded'}), "
             "moved by each stage's M less the measured one")
    missing = {"finetuning": sorted(tasks - set(ft.get("positions_per_example", {}))),
               "evaluation": sorted(tasks - set(ev.get("tasks", {})))}
    for kind, names in missing.items():
        if names:
            words += (f"; no measured {kind} figure for {', '.join(names)}: "
                      + ("seq_length per example" if kind == "finetuning" else
                         "one request of seq_length per document") + " (padding)")
    return words


def _eval_documents(task: str, task_dir: Optional[str], limit: Optional[int]) -> int:
    """The documents an evaluation scores: the offline eval file's rows or the hub split's size, at most `limit`."""
    if task_dir and os.path.isfile(TASKS[task].local_file(task_dir, "eval")):
        with open(TASKS[task].local_file(task_dir, "eval")) as fh:
            n = sum(1 for line in fh if line.strip())
    else:
        n = TASKS[task].eval_docs
    return min(n, limit) if limit else n


def _data_inputs(d: DataSpec, *, init: bool = False) -> dict:
    """What decides the data stage's output: its settings and (for real C4 files) the input files' names and
    sizes; with init, the import's tokenizer (the stage depends on it) instead of data.vocab_size."""
    inputs = {k: v for k, v in dataclasses.asdict(d).items() if k != "workers" and not (init and k == "vocab_size")}
    if d.input and d.input != "sample":
        from data_prep.c4_input import list_inputs

        try:
            inputs["files"] = [(os.path.basename(p), os.path.getsize(p)) for p in list_inputs(d.input)]
        except FileNotFoundError:
            inputs["files"] = None  # missing_inputs: a --dry-run plans without them, a run refuses
    return inputs


def ranks_per_node(r: Recipe) -> int:
    """Ranks per node of a training/evaluation stage: a GPU each on Slurm (launch.nproc on a CPU cluster)."""
    return r.launch.gpus_per_node if r.launch.executor == "slurm" and r.launch.gpus_per_node > 0 else r.launch.nproc


def _disk(cfg, vocab: int) -> tuple[float, float]:
    """Bytes of the checkpoints a training stage keeps at its end, and at its peak: with retention, a save
    writes the new checkpoint before the oldest kept one goes (keep + 1 at that moment)."""
    from pause_megatron.perf import parameter_count

    t = cfg.train
    params = parameter_count(cfg, vocab_size=vocab)
    saves = -(-t.steps // t.save_interval) if t.save_interval else 1
    keep = t.keep_checkpoints or saves
    each = params * CHECKPOINT_BYTES_PER_PARAM
    return each * min(saves, keep), each * min(saves, keep + 1)


def full_plan(r: Recipe) -> list[Stage]:
    """Every stage of the recipe, whatever `stages` selects, in an order that respects dependencies."""
    out = r.output_dir
    gpus = lambda nodes: nodes * ranks_per_node(r)  # noqa
    common = ["--tag", f"recipe={r.name}"]
    stages: list[Stage] = []
    init_deps, init_overrides, vocab = [], [], DEFAULT_VOCAB
    if r.init.hf_dir:
        stages.append(Stage(IMPORT_KEY, "import", [], f"{out}/{IMPORT_KEY}", [], time=r.init.time,
                            inputs={"hf_dir": _hf_dir_inputs(r.init.hf_dir), "seq_length": r.data.seq_length}))
        init_deps = [IMPORT_KEY]
        # Without the directory (a --dry-run before the download) the shape is the pretrain config's.
        init_overrides, vocab = _hf_model(r)
        init_overrides.append(f"train.init_from={import_root(r)}")
    data_deps = list(init_deps)
    if r.data.input:
        stages.append(Stage("data", "data", [], f"{out}/data", init_deps, time=r.data.time,
                            inputs=_data_inputs(r.data, init=bool(r.init.hf_dir))))
        data_deps = ["data", *init_deps]

    # The pretrained models: "StdPT", "PausePT" (the main ones) and "PausePT-r<ratio>" (the pause-ratio sweep,
    # online pauses) -> (stage key, pause ratio or None for StdPT).
    pretrained: dict[str, tuple[str, Optional[float]]] = {}
    main_pts = sorted({v.split("_")[0] for v in r.variants} | {v.split("_")[0] for v in r.ablations.m_inf_variants
                                                               if r.ablations.m_inf})
    # The sweep adds ratios to the main runs': 0 is StdPT and the main PausePT's ratio is that run, so a ratio
    # whose M_pt (pauses.num_pretrain_pauses) is one of theirs, or another sweep ratio's, is refused.
    sweep = [("PausePT", ratio) for ratio in r.ablations.pause_ratio]
    m_pt: dict[int, str] = {}
    for pt, ratio in [(pt, None) for pt in main_pts] + sweep:
        variant = "pause" if pt == "PausePT" else "std"
        model = pt if ratio is None else f"{pt}-r{ratio:g}"
        key = f"pretrain/{variant}" if ratio is None else f"pretrain/pause-r{ratio:g}"
        d = f"{out}/{key}"
        online = [] if ratio is None else ["pauses.source=online", f"pauses.ratio={ratio}"]
        # The imported model's architecture comes after pretrain.overrides: its weights have that shape.
        overrides = [f"data.path={r.data.path}", f"data.variant={variant}", f"train.output_dir={d}",
                     *_tracking_overrides(r), *r.pretrain.overrides, *online, *init_overrides, _run_name(key)]
        cfg = _resolve(r.pretrain.config, overrides, gpus(r.pretrain.nodes))
        if variant == "pause":
            m = num_pretrain_pauses(seq_length=cfg.model.seq_length, ratio=cfg.pauses.ratio)
            if ratio is not None and (m == 0 or m in m_pt):
                raise ConfigError(
                    f"ablations.pause_ratio: {ratio} gives M_pt = round({ratio} x {cfg.model.seq_length}) = {m} "
                    f"pauses per window, as " + ("StdPT does (the StdPT variants are ratio 0 in the report)"
                                                 if m == 0 else f"{m_pt[m]} does") + "; drop it from the list")
            m_pt[m] = f"the main PausePT (pauses.ratio={cfg.pauses.ratio})" if ratio is None else f"ratio {ratio}"
        tags = {"pretrain": pt, **({"pause_ratio": f"{cfg.pauses.ratio:g}"} if variant == "pause" else {})}
        argv = ["-m", "pause_megatron.pretrain", *(["--config", r.pretrain.config] if r.pretrain.config else []),
                *overrides, *common, *sum((["--tag", f"{k}={val}"] for k, val in tags.items()), [])]
        inputs = {"config": _config_inputs(cfg)}
        if not data_deps:  # data made outside the recipe: what it holds (with a data stage: its identity)
            inputs["data"] = _manifest_inputs(cfg.data.path)
        stages.append(Stage(key, "pretrain", argv, d, data_deps, r.pretrain.nodes, r.pretrain.time,
                            tags, _estimate(cfg, gpus(r.pretrain.nodes), vocab=vocab), _disk(cfg, vocab), inputs))
        pretrained[model] = (key, cfg.pauses.ratio if variant == "pause" else None)

    f = r.finetune
    pretrained_model = dataclasses.asdict(load_config(r.pretrain.config, [*r.pretrain.overrides, *init_overrides],
                                                      hardware=False).model)
    finetunes = []  # (variant, placement, m, ablation, pretrained model)
    sweep_models = [m for m in pretrained if m.startswith("PausePT-r")]
    for v in r.variants:
        pt, ft = v.split("_")
        if ft == "StdFT":
            finetunes.append((v, "none", 0, "main", pt))
        else:
            finetunes += [(v, "append", m, "main", pt) for m in f.m_ft]
    if r.ablations.prepend:
        finetunes += [("PausePT_PauseFT", "prepend", m, "prepend", "PausePT") for m in f.m_ft]
    for v in r.ablations.m_inf_variants if r.ablations.m_inf else []:
        pt = v.split("_")[0]
        finetunes += [(v, "append", m, "main", pt) for m in f.m_ft if (v, "append", m, "main", pt) not in finetunes]
    finetunes += [(v, placement, m, "pause_ratio", model) for model in sweep_models
                  for v, placement, m, ablation, pt in list(finetunes) if pt == "PausePT" and ablation == "main"]

    task_dir = [f"data.task_dir={f.task_dir}"] if f.task_dir else []
    data_dir = ["--data-dir", f.task_dir] if f.task_dir else []
    limit = ["--limit", str(r.evaluate.limit)] if r.evaluate.limit else []
    task_files = {task: _task_files(f.task_dir, task) for task in f.tasks}  # read once, not once per stage
    from pause_megatron.perf import measured_rates

    rates = measured_rates()
    documents = {task: _eval_documents(task, f.task_dir, r.evaluate.limit) for task in f.tasks}
    for v, placement, m, ablation, pt in finetunes:
        pretrain_key, pause_ratio = pretrained[pt]
        for task in f.tasks:
            for seed in f.seeds:
                key = f"finetune/{pt}/{task}/{placement}{m}/seed{seed}"
                d = f"{out}/{key}"
                tags = {"variant": v, "task": task, "seed": str(seed), "m_ft": str(m), "placement": placement,
                        "ablation": ablation}
                if pause_ratio is not None:
                    tags["pause_ratio"] = f"{pause_ratio:g}"
                overrides = [f"task={task}", f"train.init_from={out}/{pretrain_key}/checkpoints", f"pauses.m_ft={m}",
                             f"pauses.placement={placement}", f"train.seed={seed}", f"train.output_dir={d}",
                             *task_dir, *_tracking_overrides(r), *f.overrides, _run_name(key)]
                argv = ["-m", "pause_megatron.finetune", *(["--config", f.config] if f.config else []), *overrides,
                        *common, *sum((["--tag", f"{k}={val}"] for k, val in tags.items()), [])]
                cfg = _resolve(f.config, overrides, gpus(f.nodes), model=pretrained_model)
                stages.append(Stage(key, "finetune", argv, d, [pretrain_key],
                                    f.nodes, f.time, tags,
                                    _finetune_estimate(cfg, gpus(f.nodes), task, rates, vocab=vocab), _disk(cfg, vocab),
                                    {"config": _config_inputs(cfg), "task_files": task_files[task]}))
                # Evaluations of this model: the main one, the M_inf sweep, the filler baseline.
                evals = [(placement, m, ablation)]
                if placement == "append" and v in r.ablations.m_inf_variants and ablation == "main":
                    evals += [("append", mi, "m_inf") for mi in r.ablations.m_inf if mi <= m and mi != m]
                if v == "StdPT_StdFT" and ablation == "main":
                    evals += [("filler", mi, "filler") for mi in r.ablations.filler]
                for ev_place, m_inf, ev_ablation in evals:
                    ekey = f"evaluate/{pt}/{task}/{placement}{m}/seed{seed}/{ev_place}{m_inf}"
                    ed = f"{out}/{ekey}"
                    etags = {**tags, "m_inf": str(m_inf), "placement": ev_place, "ablation": ev_ablation,
                             "stage_key": ekey}
                    eargv = ["-m", "pause_megatron.evaluate", "--checkpoint", f"{d}/checkpoints", "--tasks", task,
                             *data_dir, *limit, "--batch-size", r.evaluate.batch_size, "--output", f"{ed}/{RESULT}", f"pauses.m_inf={m_inf}",
                             f"pauses.placement={ev_place}", *_tracking_overrides(r), _run_name(ekey), *common,
                             *sum((["--tag", f"{k}={val}"] for k, val in etags.items()), [])]
                    stages.append(Stage(ekey, "evaluate", eargv, ed, [key], r.evaluate.nodes, r.evaluate.time, etags,
                                        _eval_estimate(cfg, gpus(r.evaluate.nodes), task, documents[task], rates,
                                                       m_inf=m_inf, placement=ev_place, vocab=vocab),
                                        inputs={"task": task, "limit": r.evaluate.limit, "m_inf": m_inf,
                                                "placement": ev_place, "task_files": task_files[task]}))
    # The report's scores come from its evaluations (their identities); its labels from the variants.
    stages.append(Stage("report", "report", [], f"{out}/report", [s.key for s in stages if s.kind == "evaluate"],
                        inputs={"variants": r.variants}))
    by_key = {}
    for s in stages:  # dependencies come first, so theirs are known
        s.identity = _identity(s, [by_key[d] for d in s.deps])
        if s.argv:  # the stage's MLflow run carries it: the report takes only scores of the current identity
            s.argv = [*s.argv, "--tag", f"stage_identity={s.identity}"]
        by_key[s.key] = s
    return stages


def plan(r: Recipe) -> list[Stage]:
    """The stages that `stages` selects, in an order that respects dependencies."""
    return [s for s in full_plan(r) if s.kind in r.stages]


def missing_dependencies(r: Recipe, everything: list[Stage]) -> list[str]:
    """One line per unfinished stage that a selected stage needs but `stages` leaves out (`everything`: the
    full plan)."""
    by_key = {s.key: s for s in everything}
    selected = {s.key for s in everything if s.kind in r.stages}
    lines, seen = [], set()
    for s in everything:
        for d in s.deps if s.key in selected else ():
            if d not in selected and d not in seen and not is_done(by_key[d]) and not restorable(by_key[d]):
                seen.add(d)
                changed = os.path.exists(os.path.join(by_key[d].out, MARKER))
                lines.append(f"{s.key} needs stage {d}, which has not finished"
                             + (" with this configuration" if changed else "") + f" (add {by_key[d].kind!r} to stages)")
    return lines


# ---- running ---------------------------------------------------------------------------------------------

def read_marker(out: str) -> Optional[dict]:
    path = os.path.join(out, MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def is_done(stage: Stage) -> bool:
    marker = read_marker(stage.out)
    return bool(marker and marker.get("done") and marker.get("identity") == stage.identity)


def write_marker(out: str, key: str, identity: str, *, done: bool, job: Optional[str] = None) -> None:
    """`job`: the Slurm job that runs this identity (a rerun of the recipe leaves it alone while it is queued)."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".{MARKER}.tmp")
    with open(tmp, "w") as fh:
        json.dump({"key": key, "identity": identity, "done": done, **({"job": job} if job else {})}, fh)
    os.replace(tmp, os.path.join(out, MARKER))


def mark_done(stage: Stage) -> None:
    write_marker(stage.out, stage.key, stage.identity, done=True)


def _set_aside(stage: Stage, marker: dict, *, log) -> None:
    """Move the output of another identity to `<out>.replaced-<identity>` (with a counter if that is taken)."""
    old = marker.get("identity") or marker.get("digest") or "unknown"
    aside, n = f"{stage.out}.replaced-{old}", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{stage.out}.replaced-{old}.{n}"
    os.rename(stage.out, aside)
    log(f"  {stage.key} changed since its last run: its old output is kept in {aside}")


def _finished_aside(stage: Stage) -> Optional[str]:
    """An output set aside earlier that finished with this stage's identity, if any."""
    base = f"{stage.out}.replaced-{stage.identity}"
    parent = os.path.dirname(base) or "."
    if not os.path.isdir(parent):
        return None
    prefix = os.path.basename(base)
    for name in sorted(os.listdir(parent)):
        if name == prefix or (name.startswith(prefix + ".") and name[len(prefix) + 1:].isdigit()):
            marker = read_marker(os.path.join(parent, name))
            if marker and marker.get("done") and marker.get("identity") == stage.identity:
                return os.path.join(parent, name)
    return None


def restorable(stage: Stage) -> bool:
    """Whether restore() would put back a finished output of this identity."""
    # The data stage's shards live at data.path, outside its folder: moving the folder moves no data.
    return stage.kind != "data" and _finished_aside(stage) is not None


def restore(stage: Stage, *, log=print) -> bool:
    """Put back an earlier finished output of this identity (setting the present one aside); True if done so."""
    if not restorable(stage):
        return False
    found = _finished_aside(stage)
    if found is None:
        return False
    marker = read_marker(stage.out)
    if marker is not None:
        _set_aside(stage, marker, log=log)
    elif os.path.lexists(stage.out):  # an output without a marker: not ours to judge, keep it too
        _set_aside(stage, {"identity": "unmarked"}, log=log)
    os.rename(found, stage.out)
    log(f"  {stage.key}: restored its finished output from {found}")
    return True


def claim(stage: Stage, *, log=print) -> None:
    """Before a stage runs: keep the output of another identity aside (never reuse, never delete it), then
    record this identity as started, so that an interrupted run of the same stage resumes."""
    marker = read_marker(stage.out)
    if marker is not None and marker.get("identity") != stage.identity:
        _set_aside(stage, marker, log=log)
    write_marker(stage.out, stage.key, stage.identity, done=False)


def _import_commands(r: Recipe, python: str) -> list[list[str]]:
    """import-hf: one process on the CPU (no MLflow run, no Megatron job), model.seq_length = data.seq_length,
    through `python -m pause_megatron.recipe import` (prepare_import first: a requeued Slurm job whose import
    had finished marks it done instead of failing on import-hf's refusal to write over it)."""
    return [[python, "-m", "pause_megatron.recipe", "import", r.init.hf_dir, import_root(r), str(r.data.seq_length),
             import_tokenizer(r)]]


def _data_commands(r: Recipe, python: str) -> list[list[str]]:
    d = r.data
    cmds = []
    source = d.input
    if d.input == "sample":
        source = f"{r.output_dir}/data/c4_json"
        cmds.append([python, "-m", "data_prep.c4_sample", source, "--files", str(d.sample_files),
                     "--docs-per-file", str(d.sample_docs_per_file)])
    tokenizer = ["--tokenizer", import_tokenizer(r)] if r.init.hf_dir else ["--vocab-size", str(d.vocab_size)]
    cmds.append([python, "-m", "data_prep.build_c4", "build", "--input", source, "--output", d.path,
                 "--seq-length", str(d.seq_length), *tokenizer, "--workers", str(d.workers)])
    return cmds


def _parent_run(r: Recipe) -> Optional[str]:
    """The recipe's MLflow parent run, created once and reused when the recipe runs again.

    The stages nest under it by its id, so it is waited for (a slow server gets RUN_WAIT_SECONDS, with retries);
    a server that does not make it by then is an error, before any stage runs. The parent run only groups the
    stages (each child run carries its own status) and is reused by every later run of the recipe, so it is
    marked FINISHED as soon as it is made: no parent run is left RUNNING after the command returns.
    """
    from pause_megatron.tracking import RUN_WAIT_SECONDS, Tracker

    record = os.path.join(r.output_dir, "recipe_run.json")
    if os.path.exists(record):
        with open(record) as fh:
            return json.load(fh)["mlflow_run_id"]
    tracker = Tracker(r.tracking, enabled=True)
    tracker.start(params={"recipe": r.name, "variants": ",".join(r.variants), "tasks": ",".join(r.finetune.tasks)},
                  tags={"stage": "recipe", "recipe": r.name})
    tracker.wait_for_run_id(RUN_WAIT_SECONDS)
    tracker.end("FINISHED")  # stops the tracker's thread too: no parent run is created after this
    run_id = tracker.run_id  # read after end(): its last try may have made the run
    if run_id is None:
        raise SystemExit(f"error: MLflow ({r.tracking.uri}) did not create the recipe's parent run within "
                         f"{RUN_WAIT_SECONDS:.0f} s; no stage was run (tracking.enabled=false runs without MLflow)")
    os.makedirs(r.output_dir, exist_ok=True)
    with open(record, "w") as fh:
        json.dump({"mlflow_run_id": run_id}, fh)
    return run_id


def _local_command(stage: Stage, r: Recipe, python: str, parent: Optional[str]) -> list[str]:
    argv = list(stage.argv) + (["--parent-run-id", parent] if parent else [])
    if r.launch.nproc == 1:  # one rank needs no launcher (saves torchrun's ~2 s a stage); see _local_env
        return [python, *argv]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={r.launch.nproc}", *argv]


# A rank's rendezvous variables (runtime.dist_env): a lone rank started from a shell inside a torchrun or Slurm
# job must not join that job's world, so it gets none of them and picks its own free port, as torchrun would.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_PROCID", "SLURM_NTASKS")


def _local_env(r: Recipe, kind: str = "pretrain") -> Optional[dict]:
    """A one-process stage's environment without rank variables; None (this one) for data and torchrun."""
    if kind == "data" or (kind != "import" and r.launch.nproc != 1):  # the import is one process whatever nproc
        return None
    return {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}


def run(r: Recipe, *, recipe_path: str, overrides: list[str] = (), log=print) -> int:
    """Run (or, with Slurm, submit) every stage that is not done yet; then the report."""
    python = r.launch.python or sys.executable
    everything = full_plan(r)
    stages = [s for s in everything if s.kind in r.stages]
    missing = missing_dependencies(r, everything)
    if missing:
        for line in missing:
            log(f"error: {line}")
        return 2
    selected = {s.key for s in stages}
    # Finished dependencies left out of `stages` that were set aside: put back (on Slurm only after squeue
    # says no job is writing the folder that would be moved).
    left_out = [s for s in everything if s.key not in selected and any(s.key in t.deps for t in stages)]
    parent = _parent_run(r) if r.tracking.enabled else None
    if r.launch.executor == "slurm":
        return _submit_all(r, stages, python=python, parent=parent, recipe_path=recipe_path,
                           overrides=list(overrides), log=log, left_out=left_out)
    for s in left_out:
        if not is_done(s):
            restore(s, log=log)
    for i, stage in enumerate(stages, 1):
        if is_done(stage) or restore(stage, log=log):
            log(f"[{i}/{len(stages)}] skip {stage.key} (done)")
            continue
        log(f"[{i}/{len(stages)}] run  {stage.key}")
        claim(stage, log=log)
        if stage.kind == "import" and prepare_import(import_root(r), r.init.hf_dir, r.data.seq_length,
                                                     import_tokenizer(r), log=log):
            mark_done(stage)  # a run stopped after the import finished, before its marker
            continue
        if stage.kind == "data":
            cmds = _data_commands(r, python)
        elif stage.kind == "import":
            cmds = _import_commands(r, python)
        elif stage.kind == "report":
            from pause_megatron.report import ReportError, build_report

            try:
                build_report(r, parent_run_id=parent, log=log)
            except ReportError as exc:
                log(f"stage report failed: {exc}")
                return 1
            mark_done(stage)
            continue
        else:
            cmds = [_local_command(stage, r, python, parent)]
        with open(os.path.join(stage.out, "stage.log"), "a") as logfile:
            for cmd in cmds:
                logfile.write("+ " + shlex.join(cmd) + "\n")
                logfile.flush()
                proc = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=_local_env(r, stage.kind))
                if proc.returncode != 0:
                    log(f"stage {stage.key} failed (exit {proc.returncode}); its log: {stage.out}/stage.log")
                    return proc.returncode
        mark_done(stage)
    return 0


def _stage_job(r: Recipe, stage: Stage, *, python: str, parent: Optional[str], recipe_path: str,
               overrides: list[str]) -> tuple[list[list[str]], dict, Optional[bool]]:
    """A stage's srun steps (module and arguments), its resources by kind, and whether it runs on the CPU on
    purpose (True), needs a GPU (False) or has no Megatron rank (None)."""
    if stage.kind == "data":
        steps = [cmd[2:] for cmd in _data_commands(r, python)]  # [python, "-m", module, ...] -> module, ...
        return steps, dict(nodes=1, ntasks_per_node=1, gpus_per_node=0, cpus_per_task=r.data.workers), None
    if stage.kind == "import":  # converts on the CPU in fp32 whatever the node has (hf._cpu_only)
        steps = [cmd[2:] for cmd in _import_commands(r, python)]
        return steps, dict(nodes=1, ntasks_per_node=1, gpus_per_node=0, cpus_per_task=r.launch.cpus_per_task,
                           mem_gb=import_memory_gb(r.init.hf_dir)), None
    if stage.kind == "report":
        steps = [["pause_megatron.cli", "recipe", "report", recipe_path, *overrides]]
        return steps, dict(nodes=1, ntasks_per_node=1, gpus_per_node=0, cpus_per_task=1), None
    argv = list(stage.argv) + (["--parent-run-id", parent] if parent else [])
    gpus = r.launch.gpus_per_node
    return [argv[1:]], dict(nodes=stage.nodes, ntasks_per_node=ranks_per_node(r), gpus_per_node=gpus,
                            cpus_per_task=r.launch.cpus_per_task), gpus == 0


def _stage_job_id(stage: Stage, active: dict) -> Optional[str]:
    """The queued or running job that writes this stage's folder: the one its marker records, else one whose
    comment names the folder (its id was never recorded: an old marker, or sbatch timed out after Slurm took it)."""
    job = (read_marker(stage.out) or {}).get("job")
    if job in active:
        return job
    out = os.path.abspath(stage.out)
    return next((j for j, info in active.items() if info.out == out), None)


def _submit_all(r: Recipe, stages: list[Stage], *, python: str, parent: Optional[str], recipe_path: str,
                overrides: list[str], log, left_out: list[Stage] = ()) -> int:
    """One sbatch job per stage that is not done and not queued or running already, chained with afterok.

    A stage whose job is still queued or running is left alone (its dependents wait for that job); if that job
    runs another identity, the stage and its dependents are held until a later `recipe run`, and its folder is
    never moved (nor is a left-out dependency's, `left_out`, put back over a running job's). Each job ends by
    marking its stage done with the identity planned here, at submission: the recipe file may have changed by
    the time the job ends. Submission stops when launch.max_jobs of your jobs are queued.
    """
    from pause_megatron import slurm

    try:
        active = slurm.active_jobs()
    except slurm.SlurmError as exc:
        log(f"error: {exc}; nothing was submitted (a stage might still be queued or running)")
        return 1
    queued = len(active)
    jobs: dict[str, str] = {}  # stage key -> the job its dependents wait for
    held: set[str] = set()
    for dep in left_out:
        if is_done(dep):
            continue
        job = _stage_job_id(dep, active)
        if job is not None:
            held.add(dep.key)
            log(f"hold {dep.key} (not in stages): job {job} is still {active[job].state.lower()} in its folder; "
                f"wait for it or scancel it, then run the recipe again")
        else:
            restore(dep, log=log)
    submitted = 0
    for i, stage in enumerate(stages):
        if is_done(stage):
            log(f"skip {stage.key} (done)")
            continue
        job = _stage_job_id(stage, active)
        if job is not None:
            identity = active[job].identity or (read_marker(stage.out) or {}).get("identity")
            if identity == stage.identity:
                jobs[stage.key] = job
                log(f"wait {stage.key}: job {job} is {active[job].state.lower()}")
            else:
                held.add(stage.key)
                log(f"hold {stage.key}: job {job} is still {active[job].state.lower()} with another configuration; "
                    f"wait for it or scancel it, then run the recipe again")
            continue
        if any(d in held for d in stage.deps):
            held.add(stage.key)
            log(f"hold {stage.key}: a stage it needs is held")
            continue
        if restore(stage, log=log):
            log(f"skip {stage.key} (done)")
            continue
        if queued >= r.launch.max_jobs:
            log(f"up to {len(stages) - i} stages not submitted yet: {queued} of your jobs are queued, "
                f"launch.max_jobs is {r.launch.max_jobs}; run the recipe again later to submit the rest (nothing is submitted twice)")
            break
        claim(stage, log=log)
        if stage.kind == "import" and prepare_import(import_root(r), r.init.hf_dir, r.data.seq_length,
                                                     import_tokenizer(r), log=log):
            mark_done(stage)
            log(f"skip {stage.key} (done)")
            continue
        steps, res, cpu = _stage_job(r, stage, python=python, parent=parent, recipe_path=recipe_path,
                                     overrides=overrides)
        mark = ["-m", "pause_megatron.recipe", "mark", stage.out, stage.key, stage.identity]
        script = os.path.join(stage.out, "slurm_job.sh")
        with open(script, "w") as fh:
            fh.write(slurm.job_script(steps=steps, mark=mark, home=os.getcwd(), python=python, cpu=cpu,
                                      title=f"recipe {r.name}, stage {stage.key}, identity {stage.identity}",
                                      stop_dir=os.path.abspath(stage.out), max_requeues=r.launch.max_requeues))
        # Only training stops cleanly at the time-limit warning (it saves); an evaluation keeps nothing, and a
        # rerun with the same limit would be stopped again: it gets no warning (preemption still requeues it).
        cmd = slurm.sbatch_command(
            script, name=f"{r.name}:{stage.key}", out_dir=os.path.abspath(stage.out), time=stage.time,
            signal=r.launch.signal if stage.kind in ("pretrain", "finetune") else None,
            deps=[jobs[d] for d in stage.deps if d in jobs], extra=r.launch.sbatch_args, workdir=os.getcwd(),
            comment=slurm.stage_comment(stage.identity, stage.out), **res)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"sbatch failed for {stage.key}: {proc.stderr.strip()}")
            return proc.returncode
        jobs[stage.key] = proc.stdout.strip().split(";")[0]
        write_marker(stage.out, stage.key, stage.identity, done=False, job=jobs[stage.key])
        queued += 1
        submitted += 1
        log(f"submitted {stage.key}: job {jobs[stage.key]}")
    log(f"{submitted} jobs submitted, {len(jobs) - submitted} stages already queued or running")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def print_plan(r: Recipe, *, log=print) -> None:
    """--dry-run: every stage with its variant, GPUs, estimated hours and checkpoint disk (at its peak, during
    a save); nothing runs."""
    stages = plan(r)
    per_node = ranks_per_node(r)
    log(f"recipe {r.name}: {len(stages)} stages, executor {r.launch.executor}")
    for line in missing_inputs(r):
        log(f"note: {line}")
    if hf_dir_problem(r):
        log("note: until the model is there, this plan takes its shape from the pretrain config (model.* there) "
            "and its vocabulary from that preset's model (config.OPEN_MODEL_VOCAB)")
    log(f"{'stage':70s} {'variant':16s} {'GPUs':>5s} {'hours':>8s} {'disk':>9s}")
    gpu_hours, bound_hours, disk, extra = 0.0, 0.0, 0.0, 0.0
    for s in stages:
        g = s.nodes * per_node if s.kind in GPU_STAGES else 0
        hours = (s.estimate_s or 0.0) / 3600
        bound = s.kind in LOWER_BOUND_STAGES  # "≥": FLOPs only, see the hours line below
        est = "       -" if not s.estimate_s else ("≥" if bound else " ") + (
            f"{hours:7.1f}" if hours >= 0.05 else f"{hours:7.0e}")
        if bound:
            bound_hours += (s.estimate_s or 0.0) * max(g, 1) / 3600
        else:
            gpu_hours += (s.estimate_s or 0.0) * max(g, 1) / 3600
        end, peak = s.disk_bytes or (0.0, 0.0)
        disk, extra = disk + end, max(extra, peak - end)
        size = _size(peak) if peak else "-"
        done = " (done)" if is_done(s) else ""
        log(f"{s.key + done:70s} {s.tags.get('variant', s.tags.get('pretrain', '-')):16s} {g:5d} {est} {size:>9s}")
    from pause_megatron.perf import measured_rates

    rates = measured_rates()
    log(f"total: {gpu_hours:,.0f} GPU-hours (estimated, not measured on a GPU) for pretraining and at least "
        f"{bound_hours:,.0f} more for finetuning and evaluation (a lower bound); "
        f"{_size(disk)} of checkpoints kept at the end (train.keep_checkpoints bounds it; "
        f"{CHECKPOINT_BYTES_PER_PARAM} bytes per parameter each), and up to {_size(extra)} more for each stage "
        "saving at the same time (the disk column: a stage's peak, during a save)")
    log(f"hours: model FLOPs at an assumed {ASSUMED_MFU:.0%} MFU on H100 (not measured: no GPU run); per stage "
        "kind the positions counted are: pretrain: steps x global batch x seq_length; finetune: steps x global "
        "batch x the positions computed per example of its task (padded to each microbatch's longest); "
        "evaluate: the documents (--limit, the offline eval file's rows or the hub split's size) x lm-eval's "
        "requests per document x positions per request (generation: prompt + max_gen_toks), forward only. "
        "Finetune and evaluate hours (≥) are lower bounds, not plannable figures: a few hundred tokens per GPU "
        "per step cannot keep the assumed MFU, and per-step overhead, loading and saving checkpoints, and "
        "greedy decoding (bound by per-token latency, not FLOPs) are not counted (docs/recipes.md). "
        f"Finetune/evaluate positions: {_rates_basis(rates, {s.tags['task'] for s in stages if 'task' in s.tags})}")


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pause_megatron.recipe mark OUT_DIR STAGE_KEY IDENTITY`: a Slurm stage job's completion marker.
    `python -m pause_megatron.recipe import HF_DIR ROOT SEQ_LENGTH TOKENIZER`: the import stage's command."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) == 5 and args[0] == "import":
        hf_dir, root, seq, tokenizer = args[1:]
        if prepare_import(root, hf_dir, int(seq), tokenizer):
            print(f"{root} holds this import, finished: not imported again")
            return 0
        from pause_megatron.hf import import_main

        return import_main([hf_dir, root, "--seq-length", seq])
    if len(args) != 4 or args[0] != "mark":
        print("usage: python -m pause_megatron.recipe mark OUT_DIR STAGE_KEY IDENTITY\n"
              "       python -m pause_megatron.recipe import HF_DIR ROOT SEQ_LENGTH TOKENIZER", file=sys.stderr)
        return 2
    write_marker(args[1], args[2], args[3], done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
