from pause_megatron.kernels import quiet_fallback_warnings
from pause_megatron.progress import quiet_library_bars

quiet_fallback_warnings()  # before any module imports megatron-core (see pause_megatron.kernels)
quiet_library_bars()  # before any module imports tqdm (see pause_megatron.progress)
