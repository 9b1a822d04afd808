# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-multihost install aot-compilers clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned, so that nothing later resolves a multi-GB CUDA build of it.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[torch,test]"
	touch $(STAMP)

install: $(STAMP)

# The TPU and GPU compilers (libtpu, 0.7 GB; jax-cuda12-plugin with CUDA and cuDNN, 4.9 GB) for `python -m
# vit_jax.aot` and its tests, each in its own prefix beside the environment, never on an ordinary command's path
# (vit_jax/aot/compilers.py); installed once, about a minute here (the command skips an installed one; the
# touch keeps make from asking again).
COMPILERS := $(VENV)/vit_jax_compilers
$(COMPILERS)/%/.vit_jax_installed: $(STAMP)
	$(PY) -m vit_jax.aot --install $*
	touch $@

aot-compilers: $(COMPILERS)/tpu/.vit_jax_installed $(COMPILERS)/gpu/.vit_jax_installed

# Trains a small ViT on the bundled digits (rerunning resumes; a finished run just reports its eval), then exports
# it to TorchScript fp32, int8 qnnpack and a lite-interpreter file, with the report table. A run stopped by SIGTERM
# saves and exits with status 143, so make stops before exporting a half-trained model: rerun to resume.
demo: $(STAMP)
	$(PY) -m vit_jax.main --config configs/quickstart.py --workdir workdirs/quickstart
	$(PY) -m vit_jax.export --workdir workdirs/quickstart --out workdirs/quickstart/export

# A worker that dies (a kernel's SIGILL, a segfault) fails its test by name and is not restarted: the run ends, failed.
PYTEST_PARALLEL := -n 2 --dist loadfile --max-worker-restart 0

# The fast tier compiles for the CPU quickly: LLVM at -O0 (JAX_DISABLE_MOST_OPTIMIZATIONS) and XLA's loop emitter for
# its fusions in place of the newer fusion emitters (half the compile time of a tiny model), and each program's code
# generated in one piece rather than split for threads (the test processes already keep both cores busy; the split
# only adds work). XLA's HLO passes still run: the matmuls, custom calls (the CPU kernels) and collectives the tests
# read are the users', the FLOPs to 1e-4, only the elementwise ops are fused differently. `make test-slow` compiles as
# users' runs do, and the AOT tests' TPU and GPU compiles always optimise fully (vit_jax/aot/compilers.py).
FAST_COMPILES := JAX_DISABLE_MOST_OPTIMIZATIONS=1 XLA_FLAGS="$(strip $(XLA_FLAGS) --xla_cpu_use_fusion_emitters=false \
	--xla_cpu_parallel_codegen_split_count=1)"
test: $(STAMP) aot-compilers
	$(FAST_COMPILES) $(PY) -m pytest $(PYTEST_PARALLEL) -q

# The tier `make test` skips: every recipe compiled for TPU and GPU, the real-size parity cases, the multi-host runs.
test-slow: $(STAMP) aot-compilers
	$(PY) -m pytest $(PYTEST_PARALLEL) -q -m slow

# Two processes as two hosts (jax.distributed on localhost, gloo collectives): loss parity, SIGTERM, resume, init_from.
test-multihost: $(STAMP)
	$(PY) -m pytest -q -m multihost

clean:
	rm -rf $(VENV) .pytest_cache .cache
