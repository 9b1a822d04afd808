"""The CPU kernels' builds are never loaded on a CPU that lacks their instructions (a SIGILL kills the process), and
the suite ends a crashed test with a failure that names it, never a hang."""

import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from vit_jax.kernels import build, choices, cpu_attention

# /proc/cpuinfo flags of two real hosts: an AVX2 EPYC (family 25, model 1) and an AVX-512 one with AVX512-BF16.
AVX2 = ('flags : fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt xsave avx f16c lahf_lm abm bmi1 avx2 bmi2 '
        'sha_ni')
AVX512_BF16 = AVX2 + ' avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni'


def on_cpu(monkeypatch, flags: str, model: str):
    monkeypatch.setattr(build, 'cpu_flags', lambda: flags)
    monkeypatch.setattr(build, 'cpu_model', lambda: model)
    monkeypatch.setattr(choices, 'cpu_model', lambda: model)


def test_x86_64_levels_name_the_instructions_a_cpu_lacks(monkeypatch):
    on_cpu(monkeypatch, AVX2, 'AMD EPYC (family 25, model 1; AVX2)')
    assert build.missing_instructions('x86-64-v3') == []
    assert build.missing_instructions('x86-64-v4') == ['avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl']
    assert build.missing_instructions(['avx512_bf16', 'avx2', 'amx_tile']) == ['avx512_bf16', 'amx_tile']
    assert 'avx512f' not in build.required_instructions('native') and 'avx2' in build.required_instructions('native')
    on_cpu(monkeypatch, AVX512_BF16, 'AMD EPYC (family 25, model 17; AVX-512)')
    assert build.missing_instructions('x86-64-v4') == []
    assert {'avx512f', 'avx512_bf16'} <= set(build.required_instructions('native'))
    with pytest.raises(ValueError, match='-march=armv9-a: no table.*x86-64-v4'):
        build.required_instructions('armv9-a')


def test_an_avx512_build_is_refused_on_an_avx2_cpu_before_it_is_compiled(monkeypatch, tmp_path):
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    on_cpu(monkeypatch, AVX2, 'AMD EPYC (family 25, model 1; AVX2)')
    with pytest.raises(RuntimeError, match=r'-march=x86-64-v4 needs avx512f, avx512bw.*which this CPU \(AMD EPYC '
                                           r'\(family 25, model 1; AVX2\)\) lacks'):
        build.compile_library(cpu_attention.SOURCE, link=('-march=x86-64-v4',), variant='x86-64-v4')
    assert not list(tmp_path.iterdir())  # nothing compiled


def test_a_cache_shared_across_cpus_keys_builds_and_choices_by_instruction_sets(monkeypatch, tmp_path):
    """A home directory (or a copied ~/.cache/vit_jax) seen by an AVX-512 and an AVX2 host with the same model name:
    each host finds its own builds and choices, never the other's."""
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    paths = {}
    for name, flags in (('avx512', AVX512_BF16), ('avx2', AVX2)):
        on_cpu(monkeypatch, flags, 'AMD EPYC')
        paths[name] = (build.library_path(cpu_attention.SOURCE), choices._path('cpu_attention', ('x',)))
    assert paths['avx512'][0] != paths['avx2'][0]
    assert paths['avx512'][1] != paths['avx2'][1]
    on_cpu(monkeypatch, AVX512_BF16 + ' pdpe1gb', 'AMD EPYC')  # a flag that is no instruction set: same build
    assert build.library_path(cpu_attention.SOURCE) == paths['avx512'][0]


def test_a_library_built_for_more_instructions_than_this_cpu_has_is_not_loaded(monkeypatch, tmp_path):
    """The last guard, whatever put the file there: its .isa record is checked before it is loaded."""
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    on_cpu(monkeypatch, AVX2, 'AMD EPYC (family 25, model 1; AVX2)')
    path = build.library_path(cpu_attention.SOURCE)
    path.write_bytes(b'not loaded')
    with pytest.raises(RuntimeError, match='has no record of the instruction sets'):
        build.compile_library(cpu_attention.SOURCE)
    pathlib.Path(f'{path}.isa').write_text(json.dumps({'requires': ['avx2', 'avx512f', 'avx512_bf16']}))
    with pytest.raises(RuntimeError, match=r'built for a CPU with avx512f, avx512_bf16, which this CPU \(AMD EPYC '
                                           r'\(family 25, model 1; AVX2\)\) lacks; it would die with SIGILL'):
        build.compile_library(cpu_attention.SOURCE)
    pathlib.Path(f'{path}.isa').write_text(json.dumps({'requires': ['avx2', 'fma']}))
    assert build.compile_library(cpu_attention.SOURCE) == path


def tiny_source(folder: pathlib.Path) -> pathlib.Path:
    """A one-line library: a build whose compile takes a moment, for the tests of the build mechanism."""
    source = folder / 'tiny.cc'
    source.write_text('extern "C" int vit_jax_tiny() { return 1; }\n')
    return source


def test_a_build_records_the_instructions_it_needs(monkeypatch, tmp_path):
    """The record holds the flags of the build (-march=native: this CPU's), whatever the source; a one-line library
    stands in for the kernels (test_cpu_attention and test_cpu_gemm build those)."""
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path / 'cache'))
    source = tiny_source(tmp_path)
    path = build.compile_library(source)
    record = json.loads(pathlib.Path(f'{path}.isa').read_text())
    assert record['requires'] == list(build.isa_flags()) and record['cpu'] == build.cpu_model()
    assert build.compile_library(source) == path  # found again, guard passed


def test_processes_that_build_at_once_compile_once(monkeypatch, tmp_path):
    """Two builds of the same library started together (two xdist workers, the processes of a run on one host; here two
    threads, each with its own handle on the lock file): the second waits for the first's and loads it, one compile in
    all."""
    import threading
    import time
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path / 'cache'))
    source = tiny_source(tmp_path)
    compiles, run = [], subprocess.run

    def slow_compile(cmd, **kwargs):  # holds the build long enough for the other thread to arrive
        compiles.append(cmd)
        time.sleep(0.5)
        return run(cmd, **kwargs)

    monkeypatch.setattr(build.subprocess, 'run', slow_compile)
    paths = [None, None]
    threads = [threading.Thread(target=lambda i=i: paths.__setitem__(i, build.compile_library(source)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(compiles) == 1
    assert paths[0] == paths[1] and paths[0].exists() and pathlib.Path(f'{paths[0]}.isa').exists()


def _parallel_flags() -> list[str]:
    """The pytest-xdist flags `make test` runs with (the Makefile's PYTEST_PARALLEL)."""
    makefile = (pathlib.Path(__file__).parents[1] / 'Makefile').read_text()
    return re.search(r'^PYTEST_PARALLEL := (.*)$', makefile, re.M).group(1).split()


def test_a_crashing_test_fails_the_run_with_its_name_instead_of_hanging(tmp_path):
    """What an illegal instruction in a kernel does to `make test`: the worker dies, and the run must end, failed,
    naming the test (xdist's --max-worker-restart 0), with the other tests still reported."""
    (tmp_path / 'test_crash.py').write_text(textwrap.dedent('''
        import os, signal
        def test_fine():
            assert 1 + 1 == 2
        def test_dies_of_sigill():
            os.kill(os.getpid(), signal.SIGILL)
    '''))
    (tmp_path / 'test_other.py').write_text('def test_other():\n    assert True\n')
    run = subprocess.run([sys.executable, '-m', 'pytest', *_parallel_flags(), '-q', '-p', 'no:cacheprovider',
                          '-o', 'addopts=', str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert re.search(r'FAILED .*test_crash.py::test_dies_of_sigill', out), out
    assert re.search(r'\b1 failed\b', out) and re.search(r'\b2 passed\b', out), out


def test_the_suite_has_a_per_test_timeout():
    """A test stuck in a kernel (or a deadlock) fails after the timeout, with its stack, instead of holding CI."""
    import tomllib
    options = tomllib.loads((pathlib.Path(__file__).parents[1] / 'pyproject.toml').read_text())['tool']['pytest'][
        'ini_options']
    assert 0 < int(options['timeout']) <= 1200 and int(options['faulthandler_timeout']) < int(options['timeout'])
