"""Trains (or resumes) any registered model with any recipe on whatever devices JAX sees.

    python -m vit_jax.main --config configs/vit_b16.py --workdir DIR [--config.field=value ...]
    python -m vit_jax.main --version

Configs are locked: a misspelt ``--config.field`` fails instead of being ignored. On a multi-host TPU pod or GPU
cluster, run the same command on every host with ``--distributed`` (off Cloud TPU / SLURM / Open MPI / Kubernetes,
with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``; see ``vit_jax/distributed.py``).

Exit status: 0 when the run finished (or was already finished), 1 on an error, printed as one message (``--verbose``
or ``VIT_JAX_VERBOSE=1`` for the traceback), and 143 (128 + SIGTERM) when SIGTERM stopped the run after saving its
state: rerun the same command to resume.
"""

import os
import sys

if __name__ == '__main__':  # before the heavy imports: this may re-execute the command once (see host_memory)
    from vit_jax import host_memory
    host_memory.configure_malloc()

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vit_jax import console  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A config file in configs/ (NAME.py[:arg]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, TensorBoard events and metrics.jsonl go.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host TPU pods, GPU clusters): '
                  'the same command on every host.')
flags.DEFINE_string('coordinator_address', None, 'With --distributed: HOST:PORT of process 0 (else '
                    '$JAX_COORDINATOR_ADDRESS; found by JAX itself on Cloud TPU, SLURM, Open MPI and Kubernetes).')
flags.DEFINE_integer('num_processes', None, 'With --distributed: how many processes (else $JAX_NUM_PROCESSES or the '
                     'cluster\'s own).')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process\'s index, 0 to num_processes - 1 (else '
                     '$JAX_PROCESS_ID or the cluster\'s own).')
flags.DEFINE_string('compiled', None, 'A file of `python -m vit_jax.aot --save` for this config and these devices: '
                    'its compiled steps run instead of compiling them here (refused, naming the difference, if it was '
                    'built for another config, topology or jax).')
flags.DEFINE_bool('verbose', False, f'On an error, print the traceback too (or set {console.VERBOSE_ENV}=1).')
flags.mark_flags_as_required(['config', 'workdir'])


def _train(config, workdir: str) -> int:
    from vit_jax import models
    from vit_jax.train.validate import validate_config
    # Config errors first: before TensorFlow (~5 s), the devices, the data and any compilation.
    validate_config(config)
    models.model_info(config.model_name)
    if FLAGS.compiled:
        from vit_jax.aot import saved
        saved.check(FLAGS.compiled, config)
    console.import_tensorflow_quietly()
    import jax
    if FLAGS.distributed:
        from vit_jax import distributed
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from vit_jax.train.loop import train_and_evaluate
    logging.info('JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(), jax.process_count())
    metrics = train_and_evaluate(config, workdir, compiled=FLAGS.compiled)
    if metrics:
        print('Final eval: ' + ', '.join(f'{k}={v:.4f}' for k, v in metrics.items()))
        print(f'TensorBoard: tensorboard --logdir {workdir}    checkpoints: {workdir}/checkpoints    '
              f'metrics: {workdir}/metrics.jsonl')
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag (a misspelt or mistyped --config field) reported in one line."""
    if '--version' in argv[1:]:
        import importlib.metadata
        print(f'vit_jax {importlib.metadata.version("vit_jax")}')
        sys.exit(0)
    try:
        return FLAGS(argv)
    except Exception as e:  # absl's flags.Error, and ml_collections' AttributeError / TypeError for config fields
        if console.verbose_requested('--verbose' in argv):
            raise
        # ml_collections wraps a KeyError, whose str() is a repr: take its message itself.
        args = [a.args[0] if isinstance(a, KeyError) and a.args else a for a in e.args]
        message = ' '.join(str(a) for a in args).replace('\n', ' ') or type(e).__name__
        print(f'python -m vit_jax.main: error: {message}', file=sys.stderr)
        sys.exit(1)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(console.LibraryNoise())
    from vit_jax.train.checkpointing import CheckpointRestoreError, CheckpointSaveError, Preempted
    try:
        return _train(FLAGS.config, FLAGS.workdir)
    except Preempted as e:  # saved: a distinct status, so that schedulers and `make demo` know it did not finish
        logging.warning('%s', e)
        return e.exit_status
    except (ValueError, FloatingPointError, CheckpointRestoreError, CheckpointSaveError) as e:
        # What a user can fix (a config value, a dataset, a checkpoint, a full disk): one message, no traceback.
        if console.verbose_requested(FLAGS.verbose):
            raise
        logging.flush()
        print(console.one_line_error('python -m vit_jax.main', e), file=sys.stderr)
        return 1


if __name__ == '__main__':
    app.run(main, flags_parser=_parse_flags)
