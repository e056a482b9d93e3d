"""Checkpoints with Megatron-Core dist_checkpointing: reshardable across TP/PP, safe against a crash mid-save.

Layout of a checkpoint directory:
    iter_0000100/     one dist_checkpointing checkpoint (model, optimizer, scheduler, counters, extra)
    iter_0000100/rng/ per-rank RNG states (restored only when the parallel layout is unchanged)
    latest            the name of the newest *complete* iteration, replaced atomically after every rank
                      finished writing; a crash mid-save leaves the previous one in place.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch

from pause_megatron.compat import LEGACY_COMMON_STATE, distributed_optimizer_loading, save_checkpoint
from pause_megatron.model import unwrap
from pause_megatron.train import TrainState

LATEST = "latest"
COMPLETE = "complete"  # written in an iteration directory after everything else (shards, common state, RNG)
# The distributed optimizer's state is saved gathered, in the model's own shapes: reshardable across any
# layout, and the one format megatron-core 0.16-0.19 save without error (their default,
# "fully_sharded_model_space", fails on 0.16.1 with "ShardedTensor.flattened_range is not supported").
# Other optimizers ignore it. Both releases take it as `metadata` of sharded_state_dict.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
TOKENIZER_FILE = "tokenizer.model"  # next to `latest`: every checkpoint root carries its tokenizer


def tokenizer_path(path: str) -> str:
    """The tokenizer of a checkpoint root or of one of its iteration directories."""
    path = os.path.abspath(path)
    for candidate in (path, os.path.dirname(path)):
        if os.path.exists(os.path.join(candidate, TOKENIZER_FILE)):
            return os.path.join(candidate, TOKENIZER_FILE)
    raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} in the checkpoint directory or its parent")


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def is_complete(path: str) -> bool:
    """Whether an iteration directory holds a whole checkpoint: `save` writes COMPLETE last, after every rank's
    shards and RNG state. Older checkpoints have no COMPLETE: there dist_checkpointing's metadata.json (written
    after the common state and every shard) and a non-empty rng/ (written after them) stand for it."""
    if os.path.exists(os.path.join(path, COMPLETE)):
        return True
    rng = os.path.join(path, "rng")
    return (all(os.path.exists(os.path.join(path, name)) for name in ("metadata.json", LEGACY_COMMON_STATE))
            and os.path.isdir(rng) and bool(os.listdir(rng)))


def latest_checkpoint(root: Optional[str]) -> Optional[str]:
    """The newest complete checkpoint under `root`, or None.

    `latest` names it. If what it names is incomplete (older releases of this code deleted a finished step
    to write it again, and a crash then left `latest` naming a half-written directory), the newest complete
    iter_* is taken instead, and said so.
    """
    if not root:
        return None
    marker = os.path.join(root, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if os.path.isdir(path) and is_complete(path):
        return path
    complete = sorted(p for p in (os.path.join(root, n) for n in os.listdir(root) if n.startswith("iter_"))
                      if os.path.isdir(p) and is_complete(p))
    if complete:
        print(f"warning: {marker} names {name}, which is not a complete checkpoint; using {complete[-1]}",
              file=sys.stderr, flush=True)
        return complete[-1]
    return None


def resolve(path: str) -> str:
    """An iteration directory, given either it or a checkpoint root (whose `latest` is taken)."""
    if os.path.exists(os.path.join(path, LATEST)):
        found = latest_checkpoint(path)
        if found is None:
            with open(os.path.join(path, LATEST)) as f:
                name = f.read().strip()
            raise FileNotFoundError(f"{path}: `latest` names {name}, which is not a complete checkpoint, and no "
                                    "other iter_* directory there is complete")
        return found
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"{path} is not a checkpoint (no `latest` and no metadata.json)")
    return path


def _bare(chunks: list) -> list:
    """GPTModels without their DDP / Float16Module wrappers: checkpoint keys are the bare model's (no
    `module.` prefix), so a bf16 checkpoint loads into an fp32 model and back, and evaluation needs no DDP."""
    return [unwrap(c) for c in chunks]


def _model_sharded_state_dict(chunks: list) -> dict:
    chunks = _bare(chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _load_model_state(chunks: list, loaded: dict) -> None:
    chunks = _bare(chunks)
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])


def read_extra(path: str) -> dict:
    """The `extra` dict of a checkpoint (config, tokenizer ids and checksum), without loading any tensor."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(resolve(path)).get("extra", {})


class ModelMismatch(ValueError):
    """A run that starts from a checkpoint (train.init_from) has other model settings than the checkpoint."""


def check_init_from_model(root: str, cfg) -> None:
    """Raise ModelMismatch naming every architecture setting (config.ARCHITECTURE_KEYS) on which this run differs
    from the checkpoint it starts from. Weight shapes alone do not catch them: another norm epsilon, RoPE base or
    scaling, activation or normalization loads the same tensors and quietly computes another model."""
    from pause_megatron.config import architecture_differences, model_overrides, to_dict

    saved = (read_extra(root).get("config") or {}).get("model")
    if not saved:  # a checkpoint that records no config: nothing to compare
        return
    diffs = architecture_differences(saved, to_dict(cfg)["model"])
    if diffs:
        keys = [d.split(":", 1)[0][len("model."):] for d in diffs]
        raise ModelMismatch(f"{root} holds another model than this run's: " + "; ".join(diffs) + ". Start from it "
                            "with its settings: " + " ".join(model_overrides(saved, keys)) + " (all of them: "
                            "pause_megatron.hf.checkpoint_model_overrides, which import-hf prints)")


def load_model(chunks: list, path: str) -> dict:
    """Load only the weights of a checkpoint (any TP/PP layout) into model chunks; returns its `extra`."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_model_sharded_state_dict(chunks), resolve(path))
    _load_model_state(chunks, loaded)
    return loaded.get("extra", {})


def _rng_path(path: str) -> str:
    from megatron.core import parallel_state as ps

    name = (f"pp{ps.get_pipeline_model_parallel_rank()}_tp{ps.get_tensor_model_parallel_rank()}"
            f"_dp{ps.get_data_parallel_rank()}_of_pp{ps.get_pipeline_model_parallel_world_size()}"
            f"_tp{ps.get_tensor_model_parallel_world_size()}_dp{ps.get_data_parallel_world_size()}.pt")
    return os.path.join(path, "rng", name)


def _rng_state(cuda: bool) -> dict:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(rng: dict, cuda: bool) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and cuda:
        torch.cuda.set_rng_state(rng["cuda"])
    get_cuda_rng_tracker().set_states(rng["tracker"])


def _start_writer_queue_shielded() -> None:
    """Start dist_checkpointing's long-lived writer-results process so that it ignores SIGTERM/SIGUSR1.

    Slurm signals every process of a job step (scancel, --signal): that helper process would die, and the
    save we make *because* of the signal would then fail. Ignored signals stay ignored across the spawn
    (a blocked mask does not: the child unblocks SIGTERM), so the process is started with both ignored and
    the parent's handlers are put back at once. (megatron-core 0.16-0.19 create it lazily in
    filesystem_async._get_write_results_queue.)
    """
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "_get_write_results_queue", None)
    if start is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save(state: TrainState, root: str, *, extra: Optional[dict] = None, keep: int = 0) -> str:
    """Save everything needed to resume at `state.step`; collective (every rank calls it).

    A step that `latest` already names is complete: it is kept as it is, never deleted and written again
    (a crash mid-rewrite would leave `latest` naming nothing). keep > 0: once `latest` names this step, only
    the newest `keep` complete iterations stay (`prune`; the final one of a run is always among them).
    """
    path = iteration_dir(root, state.step)
    if latest_checkpoint(root) == path:
        return path
    _start_writer_queue_shielded()
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        if os.path.exists(path):  # a partial save of this step from a crashed run: redo it
            shutil.rmtree(path)
        os.makedirs(path)
    torch.distributed.barrier()
    sharded = _model_sharded_state_dict(state.model)
    sharded["optimizer"] = state.optimizer.sharded_state_dict(sharded, metadata=OPTIMIZER_METADATA)
    sharded["scheduler"] = state.scheduler.state_dict()
    sharded["step"] = state.step
    sharded["consumed_samples"] = state.consumed_samples
    sharded["extra"] = extra or {}
    save_checkpoint(sharded, path)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(_rng_state(state.cuda), _rng_path(path))
    torch.distributed.barrier()
    if rank0:  # only now is the checkpoint complete: say so in it, then point `latest` at it, atomically
        open(os.path.join(path, COMPLETE), "w").close()
        tmp = os.path.join(root, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(os.path.basename(path) + "\n")
        os.replace(tmp, os.path.join(root, LATEST))
        if keep > 0:
            prune(root, keep=keep, newest=state.step)
    torch.distributed.barrier()
    return path


def prune(root: str, *, keep: int, newest: int) -> list[str]:
    """Delete what the newest `keep` complete iterations up to step `newest` (which `latest` names) make
    redundant: older complete ones, and incomplete ones (a save cut short) older than the newest complete one.
    Never leaves fewer than `keep` complete iterations; returns the deleted paths."""
    steps = sorted(int(name[5:]) for name in os.listdir(root)
                   if name.startswith("iter_") and name[5:].isdigit() and int(name[5:]) <= newest)
    complete = [s for s in steps if is_complete(iteration_dir(root, s))]
    if not complete:
        return []
    kept = set(complete[-keep:])
    doomed = [iteration_dir(root, s) for s in steps if s not in kept and s < complete[-1]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load(state: TrainState, path: str, *, weights_only: bool = False) -> dict:
    """Load a checkpoint saved under any TP/PP layout into `state`; returns its `extra` dict.

    weights_only: the model alone (starting a new run from pretrained weights); otherwise the optimizer,
    scheduler, counters and (for an unchanged layout) the RNG states too, so training resumes exactly.
    """
    from megatron.core import dist_checkpointing

    path = resolve(path)
    if weights_only:
        extra = load_model(state.model, path)
        state.optimizer.reload_model_params()
        return extra
    sharded = _model_sharded_state_dict(state.model)
    with distributed_optimizer_loading(state.optimizer):
        sharded["optimizer"] = state.optimizer.sharded_state_dict(sharded, is_loading=True,
                                                                  metadata=OPTIMIZER_METADATA)
        loaded = dist_checkpointing.load(sharded, path)
        _load_model_state(state.model, loaded)
        state.optimizer.load_state_dict(loaded["optimizer"])
    state.scheduler.load_state_dict(loaded["scheduler"])
    state.step = int(loaded["step"])
    state.consumed_samples = int(loaded["consumed_samples"])
    rng = _rng_path(path)
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False), state.cuda)
    return loaded.get("extra", {})
