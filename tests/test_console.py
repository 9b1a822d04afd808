"""What the entry points print: TensorFlow's start-up banner and other libraries' INFO lines are dropped, vit_jax's and
clu's progress and metrics are kept."""

import logging
import os
import pathlib
import subprocess
import sys

from vit_jax import console

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tensorflow_imports_without_its_banner():
    """The data module a command loads first (here predict's eval transform) imports TensorFlow quietly, and the
    transform runs."""
    code = ('import io, sys\nimport numpy as np\nfrom PIL import Image\nfrom vit_jax.data import default_augment_config, '
            'preprocess\npng = io.BytesIO()\nImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")\n'
            'image = preprocess.eval_image(preprocess.tf.constant(png.getvalue()), default_augment_config(), 16)\n'
            'print("tensorflow" in sys.modules, image.shape)\nsys.stderr.write("kept\\n")')
    env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, env=env,
                            check=True)
    assert result.stdout.strip() == 'True (16, 16, 3)'
    assert result.stderr == 'kept\n'  # no oneDNN banner, no absl::InitializeLog warning; later output passes


def test_tensorflow_is_given_no_gpu(monkeypatch):
    """console.tensorflow(), where every data module takes TensorFlow from, hides the GPUs from it once per process
    (JAX owns them), before the first folder check or pipeline runs a TensorFlow op."""
    import tensorflow as tf
    hidden = []
    monkeypatch.setattr(console, '_gpus_hidden', False)
    monkeypatch.setattr(tf.config, 'set_visible_devices', lambda devices, kind: hidden.append((devices, kind)))
    assert console.tensorflow() is tf and console.tensorflow() is tf
    assert hidden == [([], 'GPU')]


def test_filtered_stderr_keeps_what_is_not_noise(capfd):
    with console.filtered_stderr(noise=('banner',)):
        os.write(2, b'a banner line\nan error a user must see\n')
    assert capfd.readouterr().err == 'an error a user must see\n'


def record(pathname: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord('absl', level, pathname, 1, message, None, None)


def test_library_noise_filter():
    keep = console.LibraryNoise().filter
    site = '/venv/lib/python3.11/site-packages'
    assert not keep(record(f'{site}/tensorflow_datasets/core/dataset_info.py', logging.INFO,
                           'Load dataset info from /root/tensorflow_datasets/sklearn_digits/1.0.0'))
    assert not keep(record(f'{site}/jax/_src/xla_bridge.py', logging.INFO, "Unable to initialize backend 'tpu'"))
    assert not keep(record(f'{site}/tensorflow_datasets/core/features/feature.py', logging.WARNING,
                           '`FeatureConnector.dtype` is deprecated.'))
    assert not keep(record(f'{site}/clu/metric_writers/logging_writer.py', logging.INFO,
                           "[Hyperparameters] {'batch_size': 128}"))
    assert keep(record(f'{site}/clu/metric_writers/logging_writer.py', logging.INFO, '[50] train_loss=1.9'))
    assert keep(record('/work/main/vit_jax/train/loop.py', logging.INFO, 'Resumed from step 40.'))
    assert keep(record(f'{site}/orbax/checkpoint/checkpoint_manager.py', logging.WARNING, 'Waiting for a save'))
    assert keep(record(f'{site}/tensorflow_datasets/core/dataset_builder.py', logging.ERROR, 'Failed'))
