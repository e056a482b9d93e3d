"""Run Megatron-Core on a CPU by mapping its CUDA requests to the CPU, inside this process only.

Megatron-Core has no CPU code path, but all of its training stack (model, DDP, optimizer, pipeline
schedules, dist_checkpointing) runs on CPU tensors once the few CUDA-only calls it makes are redirected:
device arguments naming CUDA become the CPU, the CUDA RNG functions use the CPU generator, and streams,
events and synchronisation are no-ops (the CPU runs every op in order). `enable()` is called by the runtime
when no GPU is present or PAUSE_MEGATRON_CPU=1 asks for the CPU (tests do); on a machine with a GPU it then
hides the GPU from this process (`torch.cuda.is_available()` answers False), so nothing reaches the real
device. It is never on in a GPU run, and this is the only module of the project that knows about it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_enabled = False
_mode = None


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):  # a bare ordinal means a CUDA device (not non_blocking)
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device=cuda...` arguments, `.cuda()` and `.to(cuda)` to the CPU.

    Every torch call passes through here, so the common case (nothing to rewrite) is kept to a few checks.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            if "device" in kwargs and _is_cuda(kwargs["device"]):
                kwargs = {**kwargs, "device": _CPU}
        else:
            kwargs = {}
        if func is _TENSOR_TO:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        elif func is _TENSOR_CUDA or func is _TENSOR_PIN_MEMORY:
            return args[0]
        return func(*args, **kwargs)


_TENSOR_TO = torch.Tensor.to
_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_PIN_MEMORY = torch.Tensor.pin_memory


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: the CPU executes in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _noop():
    """A fresh do-nothing function (torch.compile's rule table refuses one object under two names)."""

    def noop(*args, **kwargs):
        return None

    return noop


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tensor_type_cpu(original):
    """`tensor.type()` answers with the CUDA name for float tensors (Megatron asserts on it)."""

    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda") else name
        return original(self, dtype, non_blocking, **kwargs)

    return type_


@functools.lru_cache(maxsize=32)
def _default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _patch_causal_masks() -> None:
    """Megatron builds its default causal mask with a literal device="cuda" (transformer/utils.py); give it
    the CPU's, so that forward passes need no per-op rewriting (see `without_device_rewrites`)."""
    import importlib

    for name in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
        module = importlib.import_module(name)
        if hasattr(module, "get_default_causal_mask"):
            module.get_default_causal_mask = _default_causal_mask


def enable() -> None:
    """Turn the emulation on for this process (idempotent); a GPU, if there is one, is hidden from it."""
    global _enabled
    if _enabled:
        return
    # Import Megatron-Core first: its import runs torch.compile decorators, which snapshot torch.cuda.
    from megatron.core.tensor_parallel import random as mcore_random

    cuda = torch.cuda
    cuda.is_available = lambda: False
    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 1
    cuda.set_device = _noop()
    cuda.synchronize = _noop()
    cuda.empty_cache = _noop()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_stream = _noop()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which would recurse.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = _noop()
    cuda.nvtx.range_push = _noop()
    cuda.nvtx.range_pop = _noop()
    torch.Tensor.type = _tensor_type_cpu(torch.Tensor.type)

    mcore_random._get_cuda_rng_state = _get_rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state
    _patch_causal_masks()

    global _mode
    _mode = _CudaToCpu()
    _mode.__enter__()  # stays on for the life of the process
    _enabled = True


@contextlib.contextmanager
def without_device_rewrites():
    """Suspend the per-op device rewriting inside a block that creates no CUDA tensors by name.

    Every torch call pays for a Python `__torch_function__` while the rewriting is on; in a tight decoding
    loop of a tiny model that overhead dominates. Megatron's forward passes ask `torch.cuda.current_device()`
    (patched to the CPU) rather than naming "cuda", so they run without it. A no-op when the emulation is off.
    """
    if not _enabled:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()
