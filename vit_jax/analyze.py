"""Look inside a trained model: attention rollout, mean attention distance, position embeddings, filters.

    python -m vit_jax.analyze --workdir WORKDIR --out OUT [IMAGE...]
    python -m vit_jax.analyze --checkpoint PATH --model NAME [--override field=value ...] IMAGE... --out OUT
                              [--dataset NAME [--data-dir DIR] [--eval-split SPLIT]]

Writes to OUT (ViT paper section 4.5, figures 6 and 7):

- attention_rollout.png: the class token's rolled-out attention over the patches, overlaid on each image
  (``--head-fusion mean|max|min``, ``--discard-ratio``); ``--layer L --head H`` adds attention_layerL_headH.png, the
  class token's attention in one block (0-based) and head, without rollout;
- attention_distance.png: mean attention distance per head against depth, over ``--num-images`` eval images (128);
- position_embeddings.png: cosine similarity of each patch's position embedding with every other's;
- embedding_filters.png: the top principal components of the patch-embedding kernel, as RGB;
- analysis.json: the numbers behind every figure, and what was skipped and why.

Images: the IMAGE files, else the first eval images of the workdir's dataset (or of ``--dataset``); all through the
model's eval preprocessing. A part that a family lacks (filters of T2T, whose soft split has no linear patch filters;
of a hybrid, whose patches are ResNet features) is skipped with the reason, never a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from vit_jax.analysis import attention as attention_lib  # noqa: E402
from vit_jax.analysis import distance, filters, posemb, rollout  # noqa: E402

def eval_images(loaded, count: int, dataset: str | None = None, split: str | None = None,
                data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``count`` eval images (S, S, 3) and labels of the workdir's dataset, or of ``dataset``."""
    from vit_jax import data
    if dataset:
        from vit_jax.export.restore import eval_config
        config = eval_config(dataset, data_dir, split or 'test', loaded.image_size, 1, 'inception', 1.0)
        config.augment.update(loaded.augment.to_dict())
    elif loaded.config is not None:
        config = loaded.config
    else:
        return np.zeros((0, loaded.image_size, loaded.image_size, 3), np.float32), np.zeros(0, int), ''
    config.eval_batch_size = min(count, 256)
    images, labels = [], []
    for batch in data.eval_iterator(config):
        keep = batch['mask'] > 0
        images.append(batch['images'][keep])
        labels.append(batch['labels'][keep])
        if sum(len(x) for x in images) >= count:
            break
    return (np.concatenate(images)[:count], np.concatenate(labels)[:count],
            f'{config.dataset}:{config.eval_split}')


def rollout_maps(attentions: np.ndarray, model, head_fusion: str, discard_ratio: float) -> np.ndarray:
    """(L, B, H, N, N) -> (B, g, g): the class token's (or gap's mean) rolled-out attention over the patches."""
    prefix = model.num_prefix_tokens
    joint = rollout.attention_rollout(attentions, head_fusion, discard_ratio, prefix)
    return rollout.token_map(joint, prefix, model.grid_size)


def single_head_maps(attentions: np.ndarray, model, layer: int, head: int) -> np.ndarray:
    """(L, B, H, N, N) -> (B, g, g): block ``layer``'s head ``head``, the class token's row (gap: patch rows' mean)."""
    return rollout.token_map(attentions[layer][:, head], model.num_prefix_tokens, model.grid_size)  # no identity


def analyze(loaded, out: str, image_files: list[str] = (), num_images: int = 128, rollout_images: int = 8,
            head_fusion: str = 'mean', discard_ratio: float = 0.0, layer: int | None = None,
            head: int | None = None, dataset: str | None = None, eval_split: str | None = None,
            data_dir: str | None = None, log=print) -> dict:
    """Writes the figures and analysis.json into ``out``; returns the JSON's content."""
    from vit_jax.analysis import plotting
    from vit_jax.analysis.loading import ImageError, load_image
    from flax.core import meta
    model, params = attention_lib.require_transformer(loaded.model), meta.unbox(loaded.params)
    if layer is not None or head is not None:  # checked before minutes of work
        layer, head = layer or 0, head or 0
        if not (0 <= layer < model.num_layers and 0 <= head < model.num_heads):
            raise ValueError(f'--layer {layer} --head {head}: the model has blocks 0..{model.num_layers - 1} and '
                             f'heads 0..{model.num_heads - 1}.')
    os.makedirs(out, exist_ok=True)
    name = loaded.config.model_name if loaded.config is not None else loaded.source.get('model', '')
    report = {'source': loaded.source, 'model': name, 'image_size': model.image_size, 'grid': model.grid_size,
              'pixels_per_patch': attention_lib.pixels_per_token(model), 'num_prefix_tokens': model.num_prefix_tokens,
              'errors': [], 'figures': {}}

    def figure(key: str, filename: str) -> str:
        report['figures'][key] = filename
        return os.path.join(out, filename)

    # The images: files given, and / or eval images.
    shown, titles = [], []
    for path in image_files:
        try:
            shown.append(load_image(path, loaded.augment, loaded.image_size))
            titles.append(os.path.basename(path))
        except ImageError as e:
            report['errors'].append(str(e))
            log(f'error: {e}')
    evals, labels, where = None, None, ''
    if loaded.config is not None or dataset:
        evals, labels, where = eval_images(loaded, num_images, dataset, eval_split, data_dir)
        if dataset and loaded.class_names is None:  # a checkpoint's head without names: the dataset's, if they fit
            from vit_jax.analysis.loading import dataset_class_names
            from vit_jax.export.restore import eval_config
            names, source = dataset_class_names(eval_config(dataset, data_dir, eval_split or 'test', 1, 1,
                                                            'inception', 1.0), model.num_classes)
            if names:
                loaded.class_names, loaded.names_source = names, source
    if not shown and evals is not None and len(evals):
        shown = list(evals[:rollout_images])
        titles = [f'#{i} label {loaded.class_name(int(y))}' for i, y in enumerate(labels[:rollout_images])]
    distance_images = evals if evals is not None and len(evals) else (np.stack(shown) if shown else None)
    distance_source = where if evals is not None and len(evals) else 'the IMAGE files'

    # Attention rollout (figure 6) and one block's head, reduced batch by batch: the maps are large.
    if shown:
        images = np.stack(shown)
        maps, single, logits = [], [], []
        for attentions, outputs in attention_lib.batched_attention(model, params, images):
            maps.append(rollout_maps(attentions, model, head_fusion, discard_ratio))
            if layer is not None:
                single.append(single_head_maps(attentions, model, layer, head))
            logits.append(outputs)
        maps, logits = np.concatenate(maps), np.concatenate(logits)
        if model.num_classes and model.classifier in ('token', 'gap'):
            probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = probs / probs.sum(axis=-1, keepdims=True)
            titles = [f'{t}\npred {loaded.class_name(int(p.argmax()))} ({p.max():.2f})'
                      for t, p in zip(titles, probs)]
        display = [plotting.display_image(x, loaded.augment.normalization) for x in images]
        token = rollout.describe_token(model.num_prefix_tokens)
        plotting.plot_token_maps(display, maps, titles, figure('attention_rollout', 'attention_rollout.png'),
                                 f'attention rollout ({head_fusion} of heads, discard {discard_ratio:g}): {token}')
        report['attention_rollout'] = {'head_fusion': head_fusion, 'discard_ratio': discard_ratio, 'token': token,
                                       'images': [t.split('\n')[0] for t in titles],
                                       'maps': np.round(maps, 6).tolist()}
        if layer is not None:
            single = np.concatenate(single)
            filename = f'attention_layer{layer}_head{head}.png'
            plotting.plot_token_maps(display, single, titles, figure('single_head', filename),
                                     f'block {layer}, head {head}: {token} (no rollout)')
            report['single_head'] = {'layer': layer, 'head': head, 'maps': np.round(single, 6).tolist()}
    else:
        report['attention_rollout'] = {'skipped': 'no images: give IMAGE files, or --dataset for a checkpoint'}

    # Mean attention distance (figure 7, right), over up to --num-images eval images.
    if distance_images is not None:
        per_example = [distance.mean_attention_distance(a, model.grid_size, report['pixels_per_patch'],
                                                        model.num_prefix_tokens)
                       for a, _ in attention_lib.batched_attention(model, params, distance_images)]
        mean = np.concatenate(per_example, axis=1).astype(np.float64).mean(axis=1)  # (L, H)
        plotting.plot_attention_distance(mean, model.image_size, figure('attention_distance', 'attention_distance.png'),
                                         f'mean attention distance, {len(distance_images)} images')
        report['mean_attention_distance'] = {'pixels': np.round(mean, 4).tolist(), 'images': len(distance_images),
                                             'images_from': distance_source, 'shape': '[layer][head]'}
    else:
        report['mean_attention_distance'] = {'skipped': 'no images: give IMAGE files, or --dataset for a checkpoint'}

    # Position embeddings (figure 7, centre).
    table, kind = posemb.patch_position_embeddings(model, params)
    similarity = posemb.cosine_similarity(table)
    g = model.grid_size
    plotting.plot_position_similarity(posemb.similarity_grid(similarity, g),
                                      figure('position_embeddings', 'position_embeddings.png'),
                                      f'position embedding similarity ({kind})')
    report['position_embeddings'] = {'kind': kind, 'similarity': np.round(similarity, 4).tolist() if g <= 16 else
                                     'omitted above a 16x16 grid'}

    # Embedding filters (figure 7, left).
    reason = filters_unavailable(model)
    if reason:
        report['embedding_filters'] = {'skipped': reason}
        log(f'embedding filters skipped: {reason}')
    else:
        components, explained = filters.embedding_filters(np.asarray(params['patch_embed']['kernel']))
        plotting.plot_filters(components, explained, figure('embedding_filters', 'embedding_filters.png'),
                              'RGB embedding filters: principal components (explained variance)')
        report['embedding_filters'] = {'explained_variance_ratio': np.round(explained, 6).tolist()}

    with open(os.path.join(out, 'analysis.json'), 'w') as f:
        json.dump(report, f, indent=1)
    return report


def filters_unavailable(model) -> str:
    """Why the model has no RGB patch-embedding filters to show, or '' when it has them."""
    if model.stem == 't2t':
        return ('T2T-ViT has no linear patch embedding: its tokens-to-token module unfolds overlapping 7x7 windows '
                'into a token layer, so there are no RGB filters to decompose.')
    if model.stem == 'resnet':
        return ('a hybrid\'s patch embedding is a 1x1 projection of ResNet features, not of RGB pixels: there are no '
                'RGB filters to decompose.')
    return ''


def main(argv: list[str] | None = None) -> int:
    from vit_jax.predict import add_model_args, load_model
    p = argparse.ArgumentParser(prog='python -m vit_jax.analyze', description=__doc__.split('\n\n')[0])
    add_model_args(p)
    p.add_argument('images', nargs='*', metavar='IMAGE', help='image files for the rollout maps (and distances)')
    p.add_argument('--out', required=True, help='the output directory')
    p.add_argument('--head-fusion', default='mean', choices=rollout.HEAD_FUSIONS)
    p.add_argument('--discard-ratio', type=float, default=0.0, help='rollout: drop this fraction of lowest weights')
    p.add_argument('--layer', type=int, help='also the class token\'s attention in this block (0-based)...')
    p.add_argument('--head', type=int, help='...and this head (0-based)')
    p.add_argument('--num-images', type=int, default=128, help='eval images for the mean attention distance')
    p.add_argument('--rollout-images', type=int, default=8, help='eval images shown when no IMAGE is given')
    p.add_argument('--dataset', help='checkpoint: eval images from this TFDS dataset')
    p.add_argument('--eval-split', help='with --dataset: the split (default test)')
    args = p.parse_args(argv)
    logging.getLogger('absl').setLevel(logging.ERROR)
    if args.num_images < 1 or args.rollout_images < 1:
        p.error('--num-images and --rollout-images: give at least 1.')
    if not 0.0 <= args.discard_ratio < 1.0:
        p.error(f'--discard-ratio {args.discard_ratio}: give a fraction in [0, 1).')
    from vit_jax.checkpoints import CheckpointError
    try:
        loaded = load_model(args, p)
        if args.checkpoint and not args.images and not args.dataset:
            print('note: no IMAGE and no --dataset: only the position embeddings and filters are drawn.',
                  file=sys.stderr)
        report = analyze(loaded, args.out, args.images, args.num_images, args.rollout_images, args.head_fusion,
                         args.discard_ratio, args.layer, args.head, args.dataset, args.eval_split, args.data_dir,
                         log=lambda m: print(m, file=sys.stderr))
    except (CheckpointError, ValueError) as e:  # NotApplicableError is a ValueError
        print(f'python -m vit_jax.analyze: error: {e}', file=sys.stderr)
        return 1
    for key, filename in report['figures'].items():
        print(f'{key:>20}: {os.path.join(args.out, filename)}')
    if 'pixels' in report['mean_attention_distance']:
        d = np.asarray(report['mean_attention_distance']['pixels'])
        print(f'mean attention distance (pixels, mean over heads) by layer: {np.round(d.mean(axis=1), 2).tolist()}')
    print(f'{"numbers":>20}: {os.path.join(args.out, "analysis.json")}')
    return 1 if report['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
