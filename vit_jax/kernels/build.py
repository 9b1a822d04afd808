"""Compiling the CPU kernels' C++ on first use, into a cache keyed by everything that changes the binary.

Each kernel (``cpu_attention.cc``, ``cpu_gemm.cc``, with the ``parallel.h`` they share) is compiled with the machine's
C++ compiler (``-O3 -march=native``) into ``$VIT_JAX_CACHE`` (default ``~/.cache/vit_jax``), keyed by its sources, the
flags, jaxlib's version and the CPU's instruction sets, and loaded from there afterwards.

A library holds instructions of the CPU it was built for: run on a CPU without them it dies with SIGILL, which no
Python code can catch. So every build records the instruction sets it needs beside it (``{library}.isa``) and is
loaded only on a CPU that has them all (``missing_instructions``): a cache copied from an AVX-512 machine, or a home
directory shared between an AVX-512 and an AVX2 host, raises RuntimeError on the AVX2 host (the kernels then take XLA's
path, with the reason logged) instead of crashing the process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

HERE = pathlib.Path(__file__).parent
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
HEADERS = (HERE / 'parallel.h',)

# The /proc/cpuinfo flags of the instruction sets the kernels' compiler may emit, by what a build targets: the x86-64
# micro-architecture levels of the psABI (lzcnt is 'abm' in cpuinfo), AVX512-BF16 (vdpbf16ps) and AMX.
X86_64_LEVELS = {
    'x86-64': ('sse2',),
    'x86-64-v2': ('sse2', 'cx16', 'lahf_lm', 'popcnt', 'sse4_1', 'sse4_2', 'ssse3'),
    'x86-64-v3': ('sse2', 'cx16', 'lahf_lm', 'popcnt', 'sse4_1', 'sse4_2', 'ssse3', 'avx', 'avx2', 'bmi1', 'bmi2',
                  'f16c', 'fma', 'abm', 'movbe', 'xsave'),
}
X86_64_LEVELS['x86-64-v4'] = X86_64_LEVELS['x86-64-v3'] + ('avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl')
ISA_FLAGS = tuple(sorted({*X86_64_LEVELS['x86-64-v4'], 'avx512_bf16', 'avx512_vnni', 'avx512vbmi', 'avx512ifma',
                          'avx512_fp16', 'amx_bf16', 'amx_tile', 'amx_int8', 'asimd', 'sve', 'bf16', 'i8mm'}))


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get('VIT_JAX_CACHE', pathlib.Path.home() / '.cache' / 'vit_jax'))


def cpu_flags() -> str:
    """The CPU's feature flags (/proc/cpuinfo), which -march=native compiles for."""
    try:
        for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith(('flags', 'Features')):
                return line
    except OSError:
        pass
    return ''


def isa_flags() -> tuple[str, ...]:
    """This CPU's instruction sets among ``ISA_FLAGS``: what a build's key and its ``.isa`` record hold."""
    have = set(cpu_flags().split())
    return tuple(flag for flag in ISA_FLAGS if flag in have)


def required_instructions(march: str = 'native') -> tuple[str, ...]:
    """The instruction sets a build for ``-march=march`` may use: this CPU's own for 'native', a level's for
    'x86-64-v3' and the like. ValueError for a target this module has no table for."""
    if march == 'native':
        return isa_flags()
    if march not in X86_64_LEVELS:
        raise ValueError(f'-march={march}: no table of its instruction sets; known: native, {", ".join(X86_64_LEVELS)}')
    return X86_64_LEVELS[march]


def missing_instructions(required) -> list[str]:
    """The instruction sets among ``required`` (flags, or a -march name) that this CPU lacks: [] where it can run
    code built for them."""
    if isinstance(required, str):
        required = required_instructions(required)
    have = set(cpu_flags().split())
    return [flag for flag in required if flag not in have]


def _march(flags: tuple[str, ...]) -> str:
    """The last -march=... among compiler arguments (the one the compiler takes)."""
    return [f.split('=', 1)[1] for f in flags if f.startswith('-march=')][-1]


def load_guard(path: pathlib.Path) -> pathlib.Path:
    """``path`` if this CPU has every instruction set its build recorded, else RuntimeError naming the missing ones
    (a build without a record, from an older vit_jax, is refused too: it is rebuilt under a new key)."""
    try:
        required = json.loads(pathlib.Path(f'{path}.isa').read_text())['requires']
    except (OSError, ValueError, KeyError):
        raise RuntimeError(f'{path} has no record of the instruction sets it was built for ({path}.isa): delete it '
                           f'and it is rebuilt for this CPU') from None
    missing = missing_instructions(required)
    if missing:
        raise RuntimeError(f'{path} was built for a CPU with {", ".join(missing)}, which this CPU ({cpu_model()}) '
                           f'lacks; it would die with SIGILL here. Use a cache of this machine\'s own '
                           f'(VIT_JAX_CACHE, default ~/.cache/vit_jax) or delete the file.')
    return path


def cpu_model() -> str:
    """The CPU as benchmarks name it beside every speed figure: its model name, family and model numbers and widest
    vector ISA, e.g. 'AMD EPYC (family 25, model 1; AVX2)' (one model name can cover several generations)."""
    fields = {}
    try:
        for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
            key, _, value = line.partition(':')
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    import platform
    name = fields.get('model name') or fields.get('Model') or platform.processor() or platform.machine()
    flags = set(cpu_flags().split())
    isa = next((label for flag, label in (('amx_bf16', 'AMX-BF16'), ('avx512f', 'AVX-512'), ('avx2', 'AVX2'),
                                          ('asimd', 'NEON')) if flag in flags), None)
    details = [f'family {fields["cpu family"]}, model {fields["model"]}'] if 'cpu family' in fields else []
    return f'{name} ({"; ".join(details + ([isa] if isa else []))})' if details or isa else name


def _jaxlib_version() -> str:
    import jaxlib
    return jaxlib.__version__


def _compiler() -> str:
    compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    if compiler is None:
        raise RuntimeError('no C++ compiler found (set CXX, or install g++)')
    return compiler


def library_path(source: pathlib.Path, link: tuple[str, ...] = (), defines: tuple[str, ...] = (), variant: str = '',
                 compiler: str | None = None) -> pathlib.Path:
    """Where ``compile_library`` keeps this build: keyed by the sources, the arguments, the compiler, jaxlib and the
    CPU's instruction sets (two CPUs that differ in any of ``ISA_FLAGS`` never share a build)."""
    key = hashlib.sha256()
    for part in (source.read_bytes(), *(h.read_bytes() for h in HEADERS), ' '.join(FLAGS + link + defines).encode(),
                 (compiler or _compiler()).encode(), _jaxlib_version().encode(), ' '.join(isa_flags()).encode()):
        key.update(part)
    return cache_dir() / f'{source.stem}{"-" + variant if variant else ""}-{key.hexdigest()[:16]}.so'


def compile_library(source: pathlib.Path, link: tuple[str, ...] = (), defines: tuple[str, ...] = (),
                    variant: str = '') -> pathlib.Path:
    """Compiles ``source`` into a shared library (or finds it compiled) and returns its path; RuntimeError if it can't,
    or if this CPU lacks an instruction set of the build (``load_guard``). ``link``: extra compiler and linker
    arguments (the BLAS library linked against; a ``-march=`` other than native, for a portable build);
    ``defines``: preprocessor macros, for a ``variant`` of the source (named in the file name); all part of the cache
    key."""
    required = required_instructions(_march(FLAGS + link))
    compiler = _compiler()
    path = library_path(source, link, defines, variant, compiler)
    if path.exists():
        return load_guard(path)
    missing = missing_instructions(required)
    if missing:  # a portable build this CPU cannot run: never compiled to be loaded
        raise RuntimeError(f'a build of {source.name} for -march={_march(FLAGS + link)} needs {", ".join(missing)}, '
                           f'which this CPU ({cpu_model()}) lacks')
    path.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per library: processes that start together (pytest-xdist workers, the processes of a run on
    # one host) wait for the first one's build instead of each compiling the same file.
    with open(f'{path}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return load_guard(path)
        # Compiled to a temporary name and renamed: a process that finds the file (above, unlocked) never loads half
        # of it.
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = pathlib.Path(tmp) / path.name
            cmd = [compiler, *FLAGS, *(f'-D{d}' for d in defines), f'-I{jax.ffi.include_dir()}', f'-I{HERE}',
                   str(source), '-o', str(out), *link]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f'{" ".join(cmd)} failed:\n{result.stderr[-2000:]}')
            # The record first: a library that exists always has one.
            record = pathlib.Path(tmp) / f'{path.name}.isa'
            record.write_text(json.dumps({'requires': list(required), 'cpu': cpu_model()}))
            os.replace(record, f'{path}.isa')
            os.replace(out, path)
    return path
