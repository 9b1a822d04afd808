"""Hand-written kernels that XLA calls through its FFI, where XLA's own code is slow (see each module)."""
