"""Shared test set-up: 8 fake CPU devices (for the sharding tests), and the reference fixtures."""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def _share_compilations() -> None:
    """Caches shared by this test run, its workers and the subprocesses they start (set in the environment before
    JAX is imported):
    - JAX's persistent compilation cache, kept between runs in ``.cache/tests-xla`` (or ``$VIT_JAX_TESTS_XLA_CACHE``):
      a killed-and-resumed run, its reference and the sweep's runs compile the same programs, most of a tiny model's
      test time is compilation, and a rerun compiles only what changed. The key holds the program, XLA's flags and
      the jax version, so an entry never serves another build. Kept under 1 GiB here, oldest entries first out (JAX's
      own size limit takes a file lock around every read and write, and the run's processes waited on it);
    - the kernels' builds and measured choices (``$VIT_JAX_CACHE``), in a fresh folder removed at exit: choices timed
      while two workers load the CPU must not stay in the user's ``~/.cache/vit_jax`` for later real runs, nor decide
      a later test run's."""
    if 'VIT_JAX_TESTS_CACHE' in os.environ:  # inherited from the run's first process
        return
    import atexit
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix='vit_jax_tests_cache_')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    xla = pathlib.Path(os.environ.get('VIT_JAX_TESTS_XLA_CACHE') or pathlib.Path(__file__).parents[1] / '.cache'
                       / 'tests-xla')
    _keep_under(xla, 2 ** 30)
    os.environ.update(VIT_JAX_TESTS_CACHE=folder, VIT_JAX_CACHE=os.path.join(folder, 'kernels'),
                      JAX_COMPILATION_CACHE_DIR=str(xla),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def _keep_under(folder: pathlib.Path, limit: int) -> None:
    """Deletes the oldest files of ``folder`` until the rest hold at most ``limit`` bytes (before any process of the
    run reads it)."""
    files = sorted(((p.stat(), p) for p in folder.glob('*')), key=lambda f: f[0].st_mtime) if folder.is_dir() else []
    total = sum(stat.st_size for stat, _ in files)
    for stat, path in files:
        if total <= limit:
            break
        total -= stat.st_size
        path.unlink(missing_ok=True)


_share_compilations()

import jax  # noqa: E402

# Must happen before JAX's first use: lets the sharding tests build a (data, model) mesh on a CPU-only machine.
jax.config.update('jax_num_cpu_devices', 8)

import orbax.checkpoint as ocp  # noqa: E402

# The 8 fake devices share this host's memory, so orbax's replica-parallel saving (on by default except on GPUs) writes
# nothing in parallel: it cuts each replicated array into 8 slices, one compiled program per shape and slice, seconds of
# compiling at a tiny model's first checkpoint. Here its array handler writes each array whole from the first replica
# (the same checkpoint layout and values; the rest of the handler is orbax's). `python -m vit_jax.main` keeps orbax's
# default.
_arrays = ocp.type_handlers.get_type_handler(jax.Array)
assert hasattr(_arrays, '_use_replica_parallel'), 'orbax renamed ArrayHandler._use_replica_parallel: update conftest'
_arrays._use_replica_parallel = False

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def mock_metadata(root: pathlib.Path, name: str, splits: dict[str, int]) -> str:
    """Writes the dataset_info.json of a prepared TFDS ``name`` with these split sizes under ``root``.

    ``tfds.testing.mock_data`` fakes the records; ``vit_jax.data`` also checks that a dataset is prepared and reads
    its split sizes, which these metadata provide. Returns ``root`` as a data_dir.
    """
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=str(root))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0) for split, n in splits.items()]))
    pathlib.Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    return str(root)
