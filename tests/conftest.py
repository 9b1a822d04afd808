"""Shared test set-up: 8 fake CPU devices (for the sharding tests), and the reference fixtures."""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

# Must happen before JAX's first use: lets the sharding tests build a (data, model) mesh on a CPU-only machine.
jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
