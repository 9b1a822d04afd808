"""The TPU and GPU compilers, kept out of the default environment and run in a process of their own.

Both install from the package registry at the versions this jax pins for them (its ``tpu`` and ``cuda12`` extras:
``libtpu``, 0.7 GB; ``jax-cuda12-plugin[with-cuda]`` and ``jax-cuda12-pjrt``, 4.9 GB with CUDA and cuDNN), each into
a prefix of its own, ``$VIT_JAX_COMPILERS/{tpu,gpu}`` (default: ``vit_jax_compilers/`` in the Python environment's
prefix, e.g. ``.venv/vit_jax_compilers``), with ``pip install --target``. Nothing imports them in an ordinary
command: an ordinary command's JAX sees the CPU only, prints nothing new and starts no slower. ``python -m
vit_jax.aot`` (and the tests that compile for an accelerator) start a child process with the prefix on its
``PYTHONPATH`` and the settings a deviceless compile needs (no TPU metadata server, no CUDA driver); what the
plugins print about hardware they cannot find is dropped from its stderr, everything else passes through.

    python -m vit_jax.aot --install tpu       # or gpu; `make test` runs both when they are missing
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

KINDS = ('tpu', 'gpu')
_EXTRA = {'tpu': 'tpu', 'gpu': 'cuda12'}
_PLATFORM_PACKAGES = {'tpu': ('libtpu',), 'gpu': ('jax-cuda12-plugin', 'jax-cuda12-pjrt')}

# A deviceless compile: no metadata server to ask for the TPU's type and hosts (libtpu warns of both and of the
# worker hostnames otherwise), no CUDA driver to check the libraries against.
ENVIRONMENT = {
    # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) for the chips it would drive; a deviceless compile
    # drives none, and two of them at once (the test workers, a user's second command) must not refuse each other.
    'tpu': {'TPU_SKIP_MDS_QUERY': '1', 'TPU_ACCELERATOR_TYPE': 'v5litepod-4', 'TPU_WORKER_HOSTNAMES': 'localhost',
            'TPU_WORKER_ID': '0', 'TPU_STDERR_LOG_LEVEL': '3', 'TPU_MIN_LOG_LEVEL': '3',
            'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'},
    'gpu': {'JAX_SKIP_CUDA_CONSTRAINTS_CHECK': '1'},
}
# XLA flags of a deviceless compile. GPU: with no device to autotune on, XLA's Triton GEMM fusions found no tile sizes
# for some small dots (f32[272,64], bf16[64,64] in jax 0.10.2: "Couldn't find output tile sizes"), so matmuls go to
# cuBLAS; the memory plan and the attention calls are what they would be.
XLA_FLAGS = {'tpu': (), 'gpu': ('--xla_gpu_enable_triton_gemm=false',)}
# Full optimisation whatever the caller's environment (`make test` sets JAX_DISABLE_MOST_OPTIMIZATIONS=1 for its CPU
# compiles): the report is of the program a pod would run, not of a quick build. No persistent compilation cache
# (a JAX_COMPILATION_CACHE_DIR of the caller's): with jax 0.10.2 a deviceless compiler writes its executables there
# but cannot load them back ("PjRtCompiler must be constructed with a Client"), so a second run only warned.
COMMON_ENVIRONMENT = {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '0',
                      'JAX_ENABLE_COMPILATION_CACHE': 'false'}

# Lines the plugins print about the hardware that is not there; dropped from the child's stderr.
NOISE = re.compile(r'TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|worker hostname|Failed to find host bounds|'
                   r'Logging before InitGoogle|Source Location Trace|libtpu_init_utils|^\s*$|'
                   r'cuda_(driver|executor|dnn|blas|fft)\.cc|Unable to register cu(DNN|BLAS|FFT)|'
                   r'could not open file to read NUMA node|CUDA driver|cuInit|No GPU/TPU found|'
                   r'An NVIDIA GPU may be present|Jax plugin configuration error|computation placer already')


def root() -> pathlib.Path:
    return pathlib.Path(os.environ.get('VIT_JAX_COMPILERS') or pathlib.Path(sys.prefix) / 'vit_jax_compilers')


def prefix(kind: str) -> pathlib.Path:
    _check(kind)
    return root() / kind


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f'compiler {kind!r} is not one of {KINDS}.')


def requirements(kind: str) -> list[str]:
    """The packages this jax pins for the compiler, read from its own metadata (its ``tpu`` / ``cuda12`` extra)."""
    _check(kind)
    pins = []
    for requirement in importlib.metadata.requires('jax') or []:
        spec, _, marker = requirement.partition(';')
        if f'extra == "{_EXTRA[kind]}"' not in marker.replace("'", '"'):
            continue
        name = re.split(r'[\[<>=!~ ]', spec.strip(), maxsplit=1)[0]
        if name in _PLATFORM_PACKAGES[kind]:
            pins.append(spec.strip().replace(' ', ''))
    if kind == 'gpu':  # the plugin's own PJRT build, which its extra leaves to the plugin's dependencies
        version = importlib.metadata.version('jax')
        pins.append(f'jax-cuda12-pjrt=={version}')
    return pins


def install_command(kind: str) -> list[str]:
    return [sys.executable, '-m', 'pip', 'install', '--quiet', '--upgrade', '--target', str(prefix(kind)),
            *requirements(kind)]


def _stamp(kind: str) -> pathlib.Path:
    return prefix(kind) / '.vit_jax_installed'


def installed(kind: str) -> bool:
    """Installed for this jax (a stamp naming the pins, written after pip succeeded)."""
    stamp = _stamp(kind)
    return stamp.exists() and stamp.read_text() == ' '.join(requirements(kind))


def install(kind: str) -> None:
    """Installs the compiler into its prefix (a no-op when it is there for this jax)."""
    if installed(kind):
        return
    command = install_command(kind)
    print(f'Installing the {kind.upper()} compiler into {prefix(kind)}: {" ".join(command[2:])}', file=sys.stderr)
    subprocess.run(command, check=True)
    _stamp(kind).write_text(' '.join(requirements(kind)))


class MissingCompiler(RuntimeError):
    pass


def require(kind: str) -> None:
    if not installed(kind):
        raise MissingCompiler(f'the {kind.upper()} compiler is not installed (it stays out of the default '
                              f'environment): install it with `python -m vit_jax.aot --install {kind}` (or `make '
                              f'aot-compilers`), which runs: {" ".join(install_command(kind)[2:])}')


def environment(kind: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process that compiles for ``kind``: its prefix first on PYTHONPATH, and its settings."""
    env = dict(os.environ if base is None else base)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(prefix(kind)), env.get('PYTHONPATH')) if p)
    env.update(COMMON_ENVIRONMENT)
    env.update(ENVIRONMENT[kind])
    env['XLA_FLAGS'] = ' '.join((env.get('XLA_FLAGS', ''), *XLA_FLAGS[kind])).strip()
    return env


def run(kind: str, argv: list[str], capture: bool = False, timeout: float | None = None, cwd: str | None = None,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``python argv...`` with the compiler for ``kind``; its stderr without the plugins' hardware noise
    (printed as it comes, or captured with stdout)."""
    require(kind)
    process = subprocess.Popen([sys.executable, *argv], env={**environment(kind), **(extra_env or {})}, cwd=cwd,
                               text=True,
                               stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE)
    if capture:
        stdout, stderr = process.communicate(timeout=timeout)
        stderr = ''.join(line for line in stderr.splitlines(keepends=True) if not NOISE.search(line))
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    for line in process.stderr:
        if not NOISE.search(line):
            sys.stderr.write(line)
    process.wait(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode)


def package_version(name: str) -> tuple[int, int, int]:
    """(major, minor, patch) of an installed distribution (in the compiler's process: its prefix is on the path)."""
    parts = [int(p) for p in re.findall(r'\d+', importlib.metadata.version(name))[:3]]
    return tuple(parts + [0] * (3 - len(parts)))
