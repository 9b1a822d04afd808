"""Classify image files with a trained model: the top classes with their names and probabilities.

    python -m vit_jax.predict --workdir WORKDIR IMAGE... [--top 5] [--json]
    python -m vit_jax.predict --checkpoint PATH --model NAME [--override field=value ...] IMAGE... [--top 5]

Each image goes through exactly the model's eval preprocessing: the workdir's config (``config.augment``,
``config.image_size``), or for a checkpoint file its family's published eval transform (see
``vit_jax.analysis.loading``). Class names: the dataset's TFDS label names for a workdir; ImageNet-1k / 21k names for
a 1,000 / 21,843-class checkpoint; ``--labels FILE`` otherwise. A file that cannot be decoded is reported by name on
stderr, the others are still classified, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

BATCH = 64  # images per forward pass


def probabilities(model, params, images: np.ndarray) -> np.ndarray:
    """Images (B, S, S, 3) -> class probabilities (B, C): the softmax of the eval logits (DeiT: the heads' mean)."""
    import jax
    apply = jax.jit(model.apply)  # one compilation per batch shape for all the batches
    logits = np.concatenate([np.asarray(apply({'params': params}, images[i:i + BATCH]), np.float64)
                             for i in range(0, len(images), BATCH)])
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def check_classifier(model) -> None:
    """A ValueError when the model has no single class vector per image to rank."""
    if getattr(model, 'num_classes', 0) == 0:
        raise ValueError('the model has no classification head (num_classes=0): nothing to predict.')
    if getattr(model, 'classifier', 'token') in ('unpooled', 'token_unpooled'):
        raise ValueError(f'classifier={model.classifier!r} gives one output per token, not per image: predict needs '
                         '"token" or "gap".')


def classify_files(loaded, files: list[str], top: int = 5) -> list[dict]:
    """One result per file, in order: ``{'file', 'top': [{'class', 'name', 'probability'}]}``, or ``{'file',
    'error'}``."""
    from vit_jax.analysis.loading import ImageError, load_image
    check_classifier(loaded.model)
    results, images, where = [], [], []
    for path in files:
        try:
            images.append(load_image(path, loaded.augment, loaded.image_size))
            where.append(len(results))
            results.append({'file': path})
        except ImageError as e:
            results.append({'file': path, 'error': str(e)})
    if images:
        probs = probabilities(loaded.model, loaded.params, np.stack(images))
        k = min(top, probs.shape[1])
        for i, p in zip(where, probs):
            best = np.argsort(-p, kind='stable')[:k]
            results[i]['top'] = [{'class': int(c), 'name': loaded.class_name(int(c)), 'probability': float(p[c])}
                                 for c in best]
    return results


def format_table(results: list[dict]) -> str:
    """The results as one small table per image."""
    lines = []
    for r in results:
        if 'top' not in r:
            continue
        width = max(len(t['name']) for t in r['top'])
        lines.append(r['file'])
        lines.append(f'  {"rank":>4}  {"class":>5}  {"name":<{width}}  probability')
        for rank, t in enumerate(r['top'], 1):
            lines.append(f'  {rank:>4}  {t["class"]:>5}  {t["name"]:<{width}}  {t["probability"]:.4f}')
    return '\n'.join(lines)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options that say which model to load (shared with ``python -m vit_jax.analyze``)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--workdir', help='a training workdir (config.json + checkpoints/)')
    source.add_argument('--checkpoint', help='a checkpoint file that vit_jax.checkpoints.load_params reads')
    p.add_argument('--model', help='checkpoint: the registered model name (python -m vit_jax.models lists them)')
    p.add_argument('--override', action='append', default=[], metavar='FIELD=VALUE',
                   help='checkpoint: a create_model override, e.g. classifier=gap (repeatable)')
    p.add_argument('--num-classes', type=int, help='checkpoint: default the width of its head')
    p.add_argument('--image-size', type=int, help='checkpoint: default the registry\'s (224)')
    p.add_argument('--format', default='auto', help='checkpoint: the load_params format (default auto)')
    p.add_argument('--normalization', choices=('inception', 'imagenet'),
                   help='checkpoint: replaces the family\'s eval normalisation')
    p.add_argument('--crop-pct', type=float, help='checkpoint: replaces the family\'s eval center crop fraction')
    p.add_argument('--eval-resize', choices=('timm', 'big_vision', 'square'),
                   help='checkpoint: replaces the family\'s eval resize (see vit_jax.data.preprocess.eval_image)')
    p.add_argument('--step', type=int, help='workdir: the checkpoint step (default: the latest)')
    p.add_argument('--no-ema', action='store_true', help='workdir: use params even where ema_params exist')
    p.add_argument('--data-dir', help='workdir: the TFDS data_dir of its dataset (default the run\'s)')
    p.add_argument('--labels', help='a text file of class names, one a line, in the order of the outputs')


def load_model(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The ``Loaded`` model that ``add_model_args``'s options name."""
    from vit_jax.analysis import loading
    from vit_jax.export.restore import parse_override
    if args.workdir:
        return loading.from_workdir(args.workdir, args.step, not args.no_ema, args.data_dir, args.labels)
    if not args.model:
        parser.error('--checkpoint needs --model NAME (and the --override fields it was trained with).')
    overrides = dict(parse_override(o) for o in args.override)
    return loading.from_checkpoint(args.checkpoint, args.model, overrides, args.num_classes, args.image_size,
                                   args.format, args.labels, normalization=args.normalization,
                                   crop_pct=args.crop_pct, eval_resize=args.eval_resize)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m vit_jax.predict', description=__doc__.split('\n\n')[0])
    add_model_args(p)
    p.add_argument('images', nargs='+', metavar='IMAGE', help="image files (JPEG, PNG, GIF, BMP, WebP)")
    p.add_argument('--top', type=int, default=5, help='how many classes to print per image (default 5)')
    p.add_argument('--json', action='store_true', help='print the results as JSON instead of tables')
    args = p.parse_args(argv)
    logging.getLogger('absl').setLevel(logging.ERROR)  # orbax and TFDS chatter
    if args.top < 1:
        p.error(f'--top {args.top}: give at least 1.')
    from vit_jax.checkpoints import CheckpointError
    try:
        loaded = load_model(args, p)
        results = classify_files(loaded, args.images, args.top)
    except (CheckpointError, ValueError) as e:
        print(f'python -m vit_jax.predict: error: {e}', file=sys.stderr)
        return 1
    for r in results:
        if 'error' in r:
            print(f'python -m vit_jax.predict: error: {r["error"]}', file=sys.stderr)
    if args.json:
        print(json.dumps({'source': loaded.source, 'class_names': loaded.names_source, 'results': results}, indent=1))
    else:
        if loaded.class_names is None:
            print(f'({loaded.names_source})', file=sys.stderr)
        print(format_table(results))
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
