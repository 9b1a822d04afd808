"""Hand-written kernels that XLA calls through its FFI, where XLA's own code is slow (see each module)."""


def register_targets() -> None:
    """Loads every kernel library this machine can build and registers its FFI targets (each once per process): what
    a program compiled elsewhere, e.g. deserialised by ``vit_jax.aot.saved``, may call."""
    from vit_jax.kernels import cpu_attention, cpu_gemm
    cpu_attention._registered(), cpu_attention._blas_registered(), cpu_gemm._registered()
