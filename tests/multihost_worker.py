"""One process of a multi-process run on this machine: ``python tests/multihost_worker.py DEVICES FLAGS...``.

Gives JAX ``DEVICES`` CPU devices, then runs ``python -m vit_jax.main FLAGS...`` (with ``--distributed`` among them,
so the real entry point starts the runtime). ``VIT_JAX_TEST_SIGTERM_AT=STEP`` makes process 1 send itself SIGTERM
when its data reaches that step, and slows its later steps (0.25 s each), so that the processes' agreement on a step
to save at lands well before the run ends. Used by tests/test_multihost.py.
"""

import os
import signal
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', int(sys.argv[1]))

from absl import app  # noqa: E402

from vit_jax import data, main  # noqa: E402


def _sigterm_at(step: int):
    train_iterator = data.train_iterator

    def iterator(config, *, seed, start_step=0, process_index=0, process_count=1):
        it = train_iterator(config, seed=seed, start_step=start_step, process_index=process_index,
                            process_count=process_count)
        for i, batch in enumerate(it, start=start_step + 1):
            if process_index == 1 and i == step:
                os.kill(os.getpid(), signal.SIGTERM)
            if process_index == 1 and i >= step:
                time.sleep(0.25)
            yield batch

    data.train_iterator = iterator


if __name__ == '__main__':
    if os.environ.get('VIT_JAX_TEST_SIGTERM_AT'):
        _sigterm_at(int(os.environ['VIT_JAX_TEST_SIGTERM_AT']))
    app.run(main.main, argv=['vit_jax.main', *sys.argv[2:]], flags_parser=main._parse_flags)
