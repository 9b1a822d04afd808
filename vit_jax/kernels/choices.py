"""Which implementation a kernel call takes, measured on this machine at first use and cached on disk.

A call site names its candidates (e.g. MKL's product and XLA's dot at one shape) and a timer for them; the first
process to need a shape times them in turns, in a thread of its own (the caller may be tracing a jitted step, where
nothing runs eagerly), and writes the times and the winner to ``$VIT_JAX_CACHE/{kind}-choices-{key}.json``, keyed by
the CPU, the libraries and the sources. Later calls, and later processes, read the winner. The default candidate
(XLA's own) is kept unless another beats it by ``MARGIN``: a tie keeps what XLA can fuse with its neighbours. In a
run of several processes nothing is measured and every call takes the default: each host would otherwise pick its own
winner, and the hosts of one run must compile one program (``VIT_JAX_CPU_GEMM=mkl`` on every host forces MKL).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import threading
from typing import Callable

import jax

from vit_jax.kernels.build import cache_dir, cpu_model, isa_flags

MARGIN = 0.95

_memory: dict[str, dict[str, dict]] = {}
_lock = threading.Lock()


def _path(kind: str, parts: tuple[str, ...]) -> pathlib.Path:
    key = hashlib.sha256()
    for part in (cpu_model(), ' '.join(isa_flags()), jax.__version__, *parts):
        key.update(part.encode())
    return cache_dir() / f'{kind}-choices-{key.hexdigest()[:16]}.json'


def _load(path: pathlib.Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: pathlib.Path, key: str, entry: dict) -> None:
    # Read, merge, write to a temporary name and rename: processes measuring at once keep each other's entries.
    merged = {**_load(path), key: entry}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=path.parent, delete=False, suffix='.tmp') as f:
        json.dump(merged, f, indent=1, sort_keys=True)
    os.replace(f.name, path)


def choose(kind: str, key: str, timer: Callable[[], dict[str, float]], default: str,
           parts: tuple[str, ...] = ()) -> str:
    """The candidate that ran fastest for ``key`` here: ``timer()`` gives each candidate's best seconds (it runs
    once per machine; ``parts``: what else the cache is keyed by, e.g. library paths and kernel sources)."""
    if jax.process_count() > 1:
        # Each host would measure its own winner, and hosts must compile one program: all take the default.
        return default
    path = _path(kind, parts)
    with _lock:
        cached = _memory.setdefault(str(path), {})
        if key not in cached:
            cached.update(_load(path))
        if key in cached:
            return cached[key]['choice']
    # Measured without the lock: a timer may itself need choices (the attention kernel's variants, say).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        seconds = pool.submit(timer).result()
    best = min(seconds, key=seconds.get)
    winner = best if seconds[best] < MARGIN * seconds[default] else default
    entry = {'seconds': seconds, 'choice': winner}
    logging.info('%s %s: %s; taking %s', kind, key, ', '.join(f'{name} {1e3 * s:.2f} ms' for name, s in seconds.items()),
                 winner)
    with _lock:
        cached[key] = entry
        _save(path, key, entry)
    return winner


def forget() -> None:
    """Drops the choices held in memory (not on disk): the next call reads the disk again (tests, new processes)."""
    with _lock:
        _memory.clear()
