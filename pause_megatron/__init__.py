from pause_megatron.kernels import quiet_fallback_warnings

quiet_fallback_warnings()  # before any module imports megatron-core (see pause_megatron.kernels)
