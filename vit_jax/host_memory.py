"""glibc malloc settings for XLA on CPU: without them a train step spent a third of its time in page faults.

XLA on CPU allocates each step's temporary buffers afresh (for the ViT-Ti/16 train step at batch 32, one 1.8 GB
block), and glibc's malloc serves a block that large with mmap and unmaps it on free, so every step faults its whole
working memory in again, 4 KiB at a time. Measured on this project's 2-core CPU: 458,000 page faults and 1.2 s of
kernel time per step, and a 2.0 s step. PyTorch caches its memory and barely faults. Four glibc tunables fix it:

    glibc.malloc.mmap_max=0          never mmap: large blocks come from the heap, so freed memory is reused
    glibc.malloc.arena_max=1         one heap for all threads (only the main heap grows past 64 MiB in one piece)
    glibc.malloc.trim_threshold=2^34 never hand the heap back to the kernel between steps
    glibc.malloc.hugetlb=1           back the heap with transparent huge pages (fewer TLB misses; glibc >= 2.35)

With them the same step makes no page faults after the first, spends 0.1 s in the kernel and takes 1.25-1.45 s,
alternating with PyTorch's step in one process or not. The cost: the process keeps its peak host memory until it
exits, which is what a training run does anyway.

glibc reads tunables only when a process starts, so the command-line entry points (``python -m vit_jax.main``,
``python -m vit_jax.bench``) re-execute themselves once with them, before their heavy imports (so ``make demo``
trains with them). ``make test`` does not set them for its own process: its models are tiny and compile-bound.
Set ``VIT_JAX_MALLOC=0`` to opt out; a ``GLIBC_TUNABLES`` that already names any ``glibc.malloc`` tunable is left
as it is. Only where JAX's backend is the CPU: on a GPU or TPU host (``accelerator_backend()``, read without
importing JAX) the step's buffers live on the device, and nothing is changed.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

TUNABLES = ('glibc.malloc.mmap_max=0', 'glibc.malloc.arena_max=1', f'glibc.malloc.trim_threshold={2 ** 34}')
HUGE_PAGES = 'glibc.malloc.hugetlb=1'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def transparent_huge_pages() -> str:
    """The kernel's THP mode ('always', 'madvise' or 'never'), or 'unavailable' where there is no such setting."""
    try:
        with open(THP_SETTING) as f:
            text = f.read()
    except OSError:
        return 'unavailable'
    start, end = text.find('['), text.find(']')
    return text[start + 1:end] if 0 <= start < end else 'unavailable'


def glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr('CS_GNU_LIBC_VERSION').split()  # e.g. 'glibc 2.36'
        major, minor = version.split('.')[:2]
        return int(major), int(minor)
    except (AttributeError, OSError, ValueError):
        return None


def recommended_tunables() -> list[str]:
    """The tunables this machine supports, or [] where glibc is not the C library."""
    version = glibc_version()
    if sys.platform != 'linux' or version is None:
        return []
    tunables = list(TUNABLES)
    if version >= (2, 35) and transparent_huge_pages() in ('always', 'madvise'):
        tunables.append(HUGE_PAGES)
    return tunables


def malloc_configured() -> bool:
    """Whether this process runs with the recommended tunables."""
    current = os.environ.get('GLIBC_TUNABLES', '').split(':')
    wanted = recommended_tunables()
    return bool(wanted) and all(t in current for t in wanted)


def accelerator_backend() -> str | None:
    """'gpu' or 'tpu' where JAX will run on one, else None (the CPU), decided before JAX is imported.

    ``JAX_PLATFORMS`` decides where set; else an accelerator is JAX's backend when its plugin is installed
    (``jax[cuda12]``, ``jax[tpu]``) and its device is present.
    """
    platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
    if platforms:  # JAX tries them in order: the first is the default backend
        first = platforms.split(',')[0]
        return None if first == 'cpu' else ('tpu' if first == 'tpu' else 'gpu')
    installed = lambda *names: any(importlib.util.find_spec(n) is not None for n in names)  # noqa: E731
    if installed('jax_cuda12_plugin', 'jax_cuda13_plugin') and glob.glob('/dev/nvidia[0-9]*'):
        return 'gpu'
    if installed('libtpu') and (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
        return 'tpu'
    return None


def configure_malloc() -> None:
    """Re-executes this command once with the recommended tunables; returns at once where that is not needed.

    Only call this from a ``__main__`` entry point, before anything slow has run: the process is replaced.
    """
    tunables = os.environ.get('GLIBC_TUNABLES', '')
    wanted = recommended_tunables()
    if not wanted or os.environ.get('VIT_JAX_MALLOC', '1') == '0' or 'glibc.malloc.' in tunables:
        return
    if accelerator_backend() is not None:  # XLA's buffers are the device's there: the host's malloc is not the cost
        return
    env = dict(os.environ, GLIBC_TUNABLES=':'.join(([tunables] if tunables else []) + wanted))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
