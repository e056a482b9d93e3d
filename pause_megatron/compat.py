"""Where the supported megatron-core releases differ (0.16.1 on Python 3.11 ... 0.19.x on Python 3.12).

One constant or function per difference; its comment names the release that changed it. Each shim tests for
the feature itself, not the version number, so that a source checkout (NGC containers carry Megatron-LM
from git) takes the right branch too; tests/test_compat.py checks that the branch taken agrees with the
release named here. Call sites import from this module, and no other module looks at megatron-core's
version. The list, with what each difference breaks without its shim: docs/compatibility.md.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import re

import torch

SUPPORTED = ((0, 16, 1), (0, 20, 0))  # [oldest tested, first untested): pyproject.toml pins the same range


@functools.lru_cache(maxsize=None)
def mcore_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the installed megatron-core, pre-release suffix dropped."""
    try:
        text = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        from megatron.core import package_info

        text = package_info.__version__
    major, minor, patch = re.match(r"(\d+)\.(\d+)\.(\d+)", text).groups()
    return int(major), int(minor), int(patch)


class _DropNotice(logging.Filter):
    """Drops one upstream log message (by its opening words) and lets everything else through."""

    def __init__(self, opening: str):
        super().__init__()
        self.opening = opening

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.opening)


def _drop_notice(logger_name: str, opening: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropNotice) and f.opening == opening for f in logger.filters):
        logger.addFilter(_DropNotice(opening))


# --- model -----------------------------------------------------------------------------------------------

# 0.19.0: GPTModel.__init__ logs "GPTModel IS DEPRECATED ... use HybridModel" (a WARNING for every model
# chunk built). GPTModel still builds, trains and checkpoints exactly as before and gets bug fixes, while
# HybridModel needs Transformer Engine, which the CPU path cannot have; so we keep GPTModel and drop only
# this notice. Before 0.19 the notice does not exist and the filter never matches.
GPT_MODEL_DEPRECATION = "GPTModel IS DEPRECATED"


def gpt_model(**kwargs):
    """megatron.core.models.gpt.GPTModel(**kwargs), without 0.19's deprecation notice."""
    from megatron.core.models.gpt import GPTModel

    _drop_notice("megatron.core.models.gpt.gpt_model", GPT_MODEL_DEPRECATION)
    return GPTModel(**kwargs)


def no_cuda_graph_modules() -> dict:
    """TransformerConfig keywords for "no CUDA graph capture scope", under the name this release reads.

    0.18.0 renamed TransformerConfig.cuda_graph_scope to cuda_graph_modules. Both releases default it to
    "full" and then warn, at every config, that "full scope is deprecated" (the empty list means the same).
    We capture no CUDA graphs (cuda_graph_impl stays "none"), so we pass the empty list to silence that.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    renamed = "cuda_graph_modules" in TransformerConfig.__dataclass_fields__
    return {"cuda_graph_modules" if renamed else "cuda_graph_scope": []}


# --- inference -------------------------------------------------------------------------------------------


def inference_mode():
    """Context manager for KV-cached decoding with `GPTModel.forward(..., inference_context=...)`.

    0.18.0 made inference an explicit process-wide switch (`megatron.core.inference.utils.InferenceMode`):
    before, an eval-mode model given an inference context was in inference mode by itself; from 0.18 on it
    runs the training path (the KV cache still fills, but the prefill returns logits for every prompt
    position instead of the last one only, and the inference-only kernels stay off) unless the caller sets
    the switch. Entering this context gives 0.16's behaviour on every release.
    """
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:  # 0.16-0.17: inference mode follows from the context argument
        return contextlib.nullcontext()
    return InferenceMode.active()


def logits_at_every_position(context) -> None:
    """Make the next forward with this StaticInferenceContext return logits at every position it runs.

    A static context asks for the last position's logits only (generation's prefill). By 0.19.0 the switch
    moved from the context (`context.materialize_only_last_token_logits`, 0.16; 0.17-0.18 not checked) to its
    InferenceConfig (`context.config.materialize_only_last_token_logits`), where GPTModel reads it; setting
    the old attribute on 0.19 changes nothing, so the model keeps only each row's last position
    (`score_shared` then reads wrong positions silently, or indexes past the one it got).
    """
    config = getattr(context, "config", None)
    if config is not None and hasattr(config, "materialize_only_last_token_logits"):  # 0.19
        config.materialize_only_last_token_logits = False
    else:
        context.materialize_only_last_token_logits = False


# --- checkpoints -----------------------------------------------------------------------------------------

# 0.16.1 (and, as far as read, 0.19: the same code), without Apex or Transformer Engine (the CPU path), a
# DistributedOptimizer checkpoint cannot be loaded as megatron-core ships it: (1) sharded_state_dict asserts
# that every parameter's torch Adam state has a `step`, which a fresh optimizer has not; (2) load_state_dict
# then gives each parameter's state a `step` and copies the loaded tensors into every key of that state,
# but the loaded tensors have no `step` (KeyError); (3) that `step` is one tensor shared by all parameters,
# which torch's Adam then increments once per parameter at every step (a wrong bias correction from the
# second step after resuming). So a fresh optimizer gets placeholder state (zeros, step 0: all overwritten
# by the load), `step` is kept aside while the tensors are copied, and each parameter then gets its own
# copy of the loaded step. With Apex or TE
# (GPUs) Adam keeps its step per group, and nothing is changed.
@contextlib.contextmanager
def distributed_optimizer_loading(optimizer):
    """Around building the optimizer's sharded state dict for loading and loading it (see above)."""
    from megatron.core.optimizer import distrib_optimizer as do

    targets = [] if do.HAVE_APEX_OR_TE else [
        o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, do.DistributedOptimizer)]
    for opt in targets:
        inner = opt.optimizer
        if not len(inner.state):
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p] = {"exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data),
                                      "step": torch.tensor(0.0)}
        opt._set_main_param_and_optimizer_states = functools.partial(_set_states_without_step, opt)
    try:
        yield
    finally:
        for opt in targets:
            del opt._set_main_param_and_optimizer_states  # the class's method again
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def _set_states_without_step(opt, model_param, tensors) -> None:
    group_index, group_order = opt.model_param_group_index_map[model_param]
    state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
    step = state.pop("step", None) if "step" not in tensors else None
    try:
        type(opt)._set_main_param_and_optimizer_states(opt, model_param, tensors)
    finally:
        if step is not None:
            state["step"] = step


# 0.17.0: a synchronous dist_checkpointing.save runs through MCore's own asynchronous writer, which logs
# "MCore's async save is deprecated ... use NVRx" once per process although nothing is asynchronous here
# (0.17-0.18 when nvidia-resiliency-ext is absent, 0.19 always). Dropped; other messages pass.
ASYNC_SAVE_DEPRECATION = "MCore's async save is deprecated"

# 0.19.0 moved a checkpoint's common (non-sharded) state -- scheduler, counters, optimizer hyperparameters,
# our `extra` -- out of `common.pt` into the torch_dist shards (a ShardedObject "common_state"). 0.16-0.18
# cannot load such a checkpoint ("Common file .../common.pt does not exist"); 0.19 still reads `common.pt`
# when one is present. So after a 0.19 save we also write `common.pt`, from what 0.19 just saved: a
# checkpoint from a Python 3.12 cluster then resumes or evaluates on a Python 3.11 machine, and back.
LEGACY_COMMON_STATE = "common.pt"


def save_checkpoint(sharded_state_dict: dict, path: str) -> None:
    """dist_checkpointing.save(sharded_state_dict, path), readable by every supported release; collective.

    Like megatron-core's own save, it may add keys to `sharded_state_dict` (0.19 adds "common_state").
    """
    from megatron.core import dist_checkpointing

    _drop_notice("megatron.core.dist_checkpointing.strategies.torch", ASYNC_SAVE_DEPRECATION)
    dist_checkpointing.save(sharded_state_dict, path)
    legacy = os.path.join(path, LEGACY_COMMON_STATE)
    if torch.distributed.get_rank() == 0 and not os.path.exists(legacy):
        common = dist_checkpointing.load_common_state_dict(path)
        torch.save(common, legacy + ".tmp")
        os.replace(legacy + ".tmp", legacy)
    torch.distributed.barrier()
