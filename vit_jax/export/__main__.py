"""Export a vit_jax model to PyTorch for deployment, and measure it against JAX.

    python -m vit_jax.export --workdir WORKDIR --out OUTDIR
    python -m vit_jax.export --checkpoint PATH --model NAME [--override field=value ...] [--num-classes N]
                             [--image-size S] [--dataset D [--data-dir DIR] [--eval-split SPLIT]] --out OUTDIR

Writes OUTDIR/{model_fp32.pt, model_int8_qnnpack.pt, model_int8_qnnpack.ptl, state_dict.safetensors,
export_report.json} and prints the report as a table. With ``--workdir`` the torch variants are compared with JAX on
the eval split of the run's dataset; with ``--checkpoint`` on ``--dataset`` if given, else on random images.
Errors (a checkpoint that does not fit the model, an option without an exporter, a torch build without qnnpack, an
OUTDIR holding files an export does not write) exit with status 1 and leave no files behind. Exporting into an
earlier export replaces its files and nothing else. A workdir's newest checkpoint that does not restore is skipped
(with a warning; it is left in place) for the newest one that does, unless ``--step`` names one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m vit_jax.export', description=__doc__.split('\n\n')[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--workdir', help='a training workdir (config.json + checkpoints/)')
    source.add_argument('--checkpoint', help='a checkpoint file that vit_jax.checkpoints.load_params reads')
    p.add_argument('--out', required=True, help='the output directory: new, or an earlier export (its files are '
                   'replaced; a folder holding other files is refused)')
    p.add_argument('--step', type=int, help='workdir: the checkpoint step (default: the newest that restores)')
    p.add_argument('--no-ema', action='store_true', help='workdir: export params even where ema_params exist')
    p.add_argument('--model', help='checkpoint: the registered model name (python -m vit_jax.models lists them)')
    p.add_argument('--override', action='append', default=[], metavar='FIELD=VALUE',
                   help='checkpoint: a create_model override, e.g. hidden_size=384 (repeatable)')
    p.add_argument('--num-classes', type=int, help='checkpoint: default the width of its head')
    p.add_argument('--image-size', type=int, help='checkpoint: default the registry\'s (224)')
    p.add_argument('--format', default='auto', help='checkpoint: the load_params format (default auto)')
    p.add_argument('--dataset', help='checkpoint: compare on the eval split of this dataset (TFDS name)')
    p.add_argument('--data-dir', help='the TFDS data_dir (workdir: overrides the run\'s)')
    p.add_argument('--eval-split', default='test', help='checkpoint with --dataset: the split (default test)')
    p.add_argument('--eval-batch-size', type=int, default=64)
    p.add_argument('--normalization', default='inception', help='checkpoint with --dataset: inception | imagenet')
    p.add_argument('--crop-pct', type=float, default=0.875, help='checkpoint with --dataset: eval center crop')
    p.add_argument('--max-eval-examples', type=int, help='compare on at most this many eval images (default all)')
    p.add_argument('--no-eval', action='store_true', help='workdir: compare on random images, not the eval split')
    p.add_argument('--repeats', type=int, default=20, help='timed runs per variant (the median is reported)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, help='torch threads (default: every core of this machine)')
    args = p.parse_args(argv)
    if args.checkpoint and not args.model:
        p.error('--checkpoint needs --model NAME (and the --override fields it was trained with).')
    return args


def _eval_batches(config):
    from vit_jax import console
    console.import_tensorflow_quietly()  # only when there is a dataset to read, without its start-up banner
    from vit_jax import data
    try:
        return data.eval_iterator(config)
    except ValueError as e:
        raise ValueError(f'{e}\nThe eval split measures top-1 agreement with JAX: pass --data-dir, or --no-eval to '
                         'compare on random images.') from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    logging.getLogger('vit_jax.export').setLevel(logging.INFO)
    logging.getLogger('absl').setLevel(logging.ERROR)  # orbax and TFDS chatter
    from vit_jax.checkpoints import CheckpointError
    from vit_jax.export import ExportError
    try:
        from vit_jax.export.artefacts import require_qnnpack
        require_qnnpack()  # before minutes of loading
        from vit_jax.export import restore
        from vit_jax.export.pipeline import export
        batches, inputs = None, None
        if args.workdir:
            model, params, config, source = restore.load_workdir(args.workdir, args.step, ema=not args.no_ema)
            name = config.model_name
            if args.data_dir:
                config.data_dir = args.data_dir
            if args.no_eval:
                inputs = '8 random normal images (--no-eval: agreement on random inputs only)'
            else:
                batches = _eval_batches(config)
                inputs = f'eval split {config.dataset}:{config.eval_split}'
        else:
            overrides = dict(restore.parse_override(o) for o in args.override)
            model, params, source = restore.load_checkpoint(args.checkpoint, args.model, overrides, args.num_classes,
                                                            args.image_size, args.format)
            name = args.model
            if args.dataset:
                config = restore.eval_config(args.dataset, args.data_dir, args.eval_split, model.image_size,
                                             args.eval_batch_size, args.normalization, args.crop_pct)
                batches = _eval_batches(config)
                inputs = f'eval split {args.dataset}:{args.eval_split}'
            else:
                inputs = '8 random normal images (no --dataset given: agreement on random inputs only)'
        report = export(params, model, args.out, batches, name=name, inputs=inputs, source=source,
                        max_eval_examples=args.max_eval_examples, warmup=args.warmup, repeats=args.repeats,
                        threads=args.threads)
    except (CheckpointError, ExportError, ValueError) as e:
        print(f'python -m vit_jax.export: error: {e}', file=sys.stderr)
        return 1
    from vit_jax.export.report import format_table
    print(format_table(report))
    print(f'\nWrote {os.path.abspath(args.out)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
