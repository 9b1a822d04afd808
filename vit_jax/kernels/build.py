"""Compiling the CPU kernels' C++ on first use, into a cache keyed by everything that changes the binary.

Each kernel (``cpu_attention.cc``, ``cpu_gemm.cc``, with the ``parallel.h`` they share) is compiled with the machine's
C++ compiler (``-O3 -march=native``) into ``$VIT_JAX_CACHE`` (default ``~/.cache/vit_jax``), keyed by its sources, the
flags, jaxlib's version and the CPU, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

HERE = pathlib.Path(__file__).parent
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
HEADERS = (HERE / 'parallel.h',)


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


def compile_library(source: pathlib.Path, link: tuple[str, ...] = (), defines: tuple[str, ...] = (),
                    variant: str = '') -> pathlib.Path:
    """Compiles ``source`` into a shared library (or finds it compiled) and returns its path; RuntimeError if it can't.
    ``link``: extra linker arguments (e.g. the BLAS library linked against); ``defines``: preprocessor macros, for a
    ``variant`` of the source (named in the file name); both part of the cache key."""
    compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    if compiler is None:
        raise RuntimeError('no C++ compiler found (set CXX, or install g++)')
    key = hashlib.sha256()
    for part in (source.read_bytes(), *(h.read_bytes() for h in HEADERS), ' '.join(FLAGS + link + defines).encode(),
                 compiler.encode(), _jaxlib_version().encode(), cpu_flags().encode()):
        key.update(part)
    path = cache_dir() / f'{source.stem}{"-" + variant if variant else ""}-{key.hexdigest()[:16]}.so'
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: processes building at once (pytest-xdist workers) never load half a file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = pathlib.Path(tmp) / path.name
        cmd = [compiler, *FLAGS, *(f'-D{d}' for d in defines), f'-I{jax.ffi.include_dir()}', f'-I{HERE}', str(source),
               '-o', str(out), *link]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)} failed:\n{result.stderr[-2000:]}')
        os.replace(out, path)
    return path
