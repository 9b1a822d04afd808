"""The glibc malloc tunables (vit_jax.host_memory): XLA's per-step buffers stop faulting in once they are set."""

import json
import os
import subprocess
import sys

import pytest

from vit_jax import host_memory

TUNABLES = host_memory.recommended_tunables()
needs_glibc = pytest.mark.skipif(not TUNABLES, reason='glibc is not the C library here')

# A jitted program whose temporaries (4096^2 float32, 64 MiB each) are larger than any malloc heap chunk.
FAULTS_PER_CALL = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.cos(x)))
x = jnp.ones((4096, 4096))
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _run(code_or_args, tunables: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    if tunables:
        env['GLIBC_TUNABLES'] = tunables
    args = code_or_args if isinstance(code_or_args, list) else ['-c', code_or_args]
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=True,
                          timeout=300).stdout


@needs_glibc
@pytest.mark.slow  # ~1 min: times ViT-S steps with and without the tunables
def test_tunables_stop_page_faults_per_call():
    if host_memory.transparent_huge_pages() == 'always':
        pytest.skip('the kernel backs large mappings with huge pages by default here: few faults either way')
    default = float(_run(FAULTS_PER_CALL, '').strip().splitlines()[-1])
    tuned = float(_run(FAULTS_PER_CALL, ':'.join(TUNABLES)).strip().splitlines()[-1])
    # Two 64 MiB temporaries are 32,768 pages of 4 KiB: glibc maps them afresh on every call unless tuned.
    assert default > 16_000
    assert tuned < 0.05 * default


@needs_glibc
def test_entry_point_reexecutes_itself_with_the_tunables(tmp_path):
    args = ['-m', 'vit_jax.bench', '--model', 'vit_ti16', '--override', 'num_layers=1', '--override',
            'hidden_size=48', '--override', 'num_heads=3', '--override', 'mlp_dim=96', '--override', 'patch_size=8',
            '--image-size', '32', '--batch', '4', '--num-classes', '10', '--steps', '1', '--warmup', '1',
            '--mode', 'infer']
    assert json.loads(_run(args, '').strip().splitlines()[-1])['malloc_tuned'] is True


@needs_glibc
def test_opting_out_and_own_malloc_tunables_are_respected(monkeypatch):
    calls = []
    monkeypatch.setattr(os, 'execve', lambda path, argv, env: calls.append(env['GLIBC_TUNABLES']))
    monkeypatch.setenv('VIT_JAX_MALLOC', '0')
    host_memory.configure_malloc()
    monkeypatch.delenv('VIT_JAX_MALLOC')
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=4')
    host_memory.configure_malloc()
    assert calls == []
    # Tunables of other glibc parts are kept, and ours added after them.
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.rtld.optional_static_tls=2048')
    host_memory.configure_malloc()
    assert calls == [':'.join(['glibc.rtld.optional_static_tls=2048'] + TUNABLES)]


def test_recommended_tunables_match_the_machine():
    if sys.platform != 'linux' or host_memory.glibc_version() is None:
        assert TUNABLES == []
        return
    assert TUNABLES[:3] == list(host_memory.TUNABLES)
    huge = host_memory.glibc_version() >= (2, 35) and host_memory.transparent_huge_pages() in ('always', 'madvise')
    assert (host_memory.HUGE_PAGES in TUNABLES) == huge


@needs_glibc
@pytest.mark.parametrize('platforms, reexecs', [('cuda', False), ('tpu', False), ('gpu,cpu', False), ('cpu', True),
                                                ('', True)])
def test_reexecutes_only_where_the_backend_is_the_cpu(monkeypatch, platforms, reexecs):
    calls = []
    monkeypatch.setattr(os, 'execve', lambda path, argv, env: calls.append(env['GLIBC_TUNABLES']))
    monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
    monkeypatch.delenv('VIT_JAX_MALLOC', raising=False)
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    host_memory.configure_malloc()
    # This machine has no GPU / TPU plugin and device: with JAX_PLATFORMS unset, JAX runs on its CPU.
    assert calls == ([':'.join(TUNABLES)] if reexecs else [])


def test_an_accelerator_needs_its_plugin_and_its_device(monkeypatch):
    monkeypatch.delenv('JAX_PLATFORMS', raising=False)
    assert host_memory.accelerator_backend() is None  # this machine: no jax[cuda12] / jax[tpu]
    monkeypatch.setattr(host_memory.importlib.util, 'find_spec', lambda name: name == 'jax_cuda12_plugin' or None)
    monkeypatch.setattr(host_memory.glob, 'glob', lambda pattern: ['/dev/nvidia0'] if 'nvidia' in pattern else [])
    assert host_memory.accelerator_backend() == 'gpu'
    monkeypatch.setattr(host_memory.glob, 'glob', lambda pattern: [])
    assert host_memory.accelerator_backend() is None  # the plugin without a GPU: JAX falls back to the CPU
