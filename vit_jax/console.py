"""What the command-line entry points print: nothing a user cannot act on, and an error as one message.

- TensorFlow's C++ start-up lines (the oneDNN banner, printed once per library that links it, and absl's
  "before absl::InitializeLog()" warning) are dropped while TensorFlow is imported; anything else it prints passes.
- INFO lines of libraries (TFDS "Load dataset info", JAX "Unable to initialize backend 'tpu'", orbax's per-save
  chatter) and their deprecation warnings are dropped; their other warnings and errors, and what vit_jax and clu's
  metric writers log (progress, metrics), are kept.
- Errors a user can fix (a bad config, a missing dataset, a checkpoint that does not fit) are printed as one message
  without a traceback; ``--verbose`` or ``VIT_JAX_VERBOSE=1`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

VERBOSE_ENV = 'VIT_JAX_VERBOSE'
# Lines TensorFlow's C++ libraries print at import whatever TF_CPP_MIN_LOG_LEVEL says.
TF_IMPORT_NOISE = ('oneDNN custom operations are on', 'All log messages before absl::InitializeLog()',
                   'rebuild TensorFlow with the appropriate compiler flags', 'To enable the following instructions',
                   'This TensorFlow binary is optimized to use available CPU instructions')
_KEPT_LIBRARIES = (f'{os.sep}vit_jax{os.sep}', f'{os.sep}clu{os.sep}')


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, '') not in ('', '0')


@contextlib.contextmanager
def filtered_stderr(noise: tuple[str, ...] = TF_IMPORT_NOISE) -> Iterator[None]:
    """Captures file descriptor 2 (C++ writes there directly), then writes back the lines that are not ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode='w+b') as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors='replace').splitlines(keepends=True)
                    if not any(n in line for n in noise)]
            if kept:
                sys.stderr.write(''.join(kept))
                sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (and so TFDS's and clu's use of it) without its start-up banner; once per process."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if 'tensorflow' in sys.modules:
        return
    with filtered_stderr():
        import tensorflow  # noqa: F401


_gpus_hidden = False


def tensorflow():
    """The ``tensorflow`` module, imported without its start-up banner and with the GPUs hidden from it: the data
    modules take it from here, so that whichever of them a command loads first (training's pipeline, a folder
    dataset's checks, predict's eval transform) does both before any TensorFlow op runs."""
    global _gpus_hidden
    import_tensorflow_quietly()
    import tensorflow as tf
    if not _gpus_hidden:
        _gpus_hidden = True
        # JAX owns the accelerators; TensorFlow would otherwise reserve all of their memory for its own use.
        try:
            tf.config.set_visible_devices([], 'GPU')
        except RuntimeError:  # TensorFlow already initialised its devices (someone ran TF ops first): nothing to do
            pass
    return tf


class LibraryNoise(logging.Filter):
    """Keeps errors, warnings a user can act on and vit_jax's and clu's INFO lines (progress, metrics); drops other
    libraries' INFO lines and deprecation notices (TFDS warns of its own API), and clu's one-line dump of the whole
    config (it is in config.json)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = any(k in record.pathname for k in _KEPT_LIBRARIES)
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return ours or 'deprecated' not in message
        return ours and not message.startswith('[Hyperparameters]')


def one_line_error(prog: str, error: BaseException) -> str:
    """``prog: error: message`` and how to see the traceback."""
    return (f'{prog}: error: {error}\n(rerun with --verbose or {VERBOSE_ENV}=1 for the traceback: '
            f'{type(error).__name__})')
