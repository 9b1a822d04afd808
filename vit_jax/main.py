"""Trains (or resumes) any registered model with any recipe on whatever devices JAX sees.

    python -m vit_jax.main --config configs/vit_b16.py --workdir DIR [--config.field=value ...]

Configs are locked: a misspelt ``--config.field`` fails instead of being ignored. On a multi-host TPU pod or GPU
cluster, run the same command on every host with ``--distributed``.
"""

import logging as pylogging
import os

if __name__ == '__main__':  # before the heavy imports: this may re-execute the command once (see host_memory)
    from vit_jax import host_memory
    host_memory.configure_malloc()

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A config file in configs/ (NAME.py[:arg]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, TensorBoard events and metrics.jsonl go.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host TPU pods, GPU clusters).')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietCheckpointer(pylogging.Filter):
    """orbax logs a dozen INFO lines per save; keep its warnings and errors only."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_QuietCheckpointer())
    import jax
    if FLAGS.distributed:
        jax.distributed.initialize()
    from vit_jax.train.loop import train_and_evaluate
    logging.info('JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(), jax.process_count())
    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if metrics:
        print('Final eval: ' + ', '.join(f'{k}={v:.4f}' for k, v in metrics.items()))
        print(f'TensorBoard: tensorboard --logdir {FLAGS.workdir}    checkpoints: {FLAGS.workdir}/checkpoints    '
              f'metrics: {FLAGS.workdir}/metrics.jsonl')


if __name__ == '__main__':
    app.run(main)
