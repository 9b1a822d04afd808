"""Masked patch prediction vs MAE vs no pretraining, on the bundled digits: few-shot probes and label-scarce fine-tuning.

    python experiments/self_supervised.py --workdir workdirs/self_supervised [--seeds 0 1 2]

1. Pretrain the quickstart-sized ViT (4 layers, width 96, 4 x 4 patches of the 16 px digits) without labels, once
   with masked patch prediction (the ViT paper's: 50% corrupted, 3-bit mean colours) and once with MAE (75% masked,
   a 2-block decoder of width 64, normalised pixels), on all 1,437 training images.
2. (a) Linear few-shot accuracy (``vit_jax.fewshot``: big_vision's closed-form least squares on frozen pre-logits)
   at 1, 5 and 10 shots of each encoder and of the same encoder at random init, on the 360 test digits; 3 draws of
   the shots per seed of the encoder.
3. (b) Fine-tune each (and a model from scratch) with the labels of the first 10% of the training images (143), for
   each seed, and report test top-1.
Each run is a ``vit_jax.main`` workdir under ``--workdir``; rerunning skips finished ones. Prints the tables and
writes ``WORKDIR/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from flax.core import meta  # noqa: E402

from vit_jax import data, fewshot, models  # noqa: E402
from vit_jax.train.config import load_config  # noqa: E402
from vit_jax.train.loop import train_and_evaluate  # noqa: E402

QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')
SHOTS = (1, 5, 10)


def base(steps: int, seed: int, objective: str):
    c = load_config(QUICKSTART)
    c.seed = seed
    c.total_steps = steps
    c.optimizer.warmup_steps = steps // 10
    c.objective = objective
    c.model.posemb = 'sincos2d'  # MAE's fixed positions; the same encoder for every row
    c.mae.update(decoder_width=64, decoder_depth=2, decoder_heads=4)
    c.fewshot.update(shots=SHOTS, seeds=3)
    c.log_every = 50
    c.eval_every = c.checkpoint_every = steps
    return c


def run(config, workdir: str) -> dict:
    done = os.path.join(workdir, 'DONE')
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    return train_and_evaluate(config, workdir)


def random_init_fewshot(config) -> dict:
    """The few-shot accuracies of the encoder at init (the baseline the pretrained encoders must beat)."""
    model = models.create_model(config.model_name, num_classes=10, image_size=config.image_size,
                                **{k: v for k, v in config.model.items() if v is not None})
    params = meta.unbox(model.init(jax.random.key(config.seed), np.zeros((1, 16, 16, 3), np.float32))['params'])
    features = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates'])[1]
                       ['intermediates']['pre_logits'][0])

    def split(name):
        c = copy.deepcopy(config)
        c.eval_split = name
        xs, ys = [], []
        for batch in data.eval_iterator(c):
            keep = batch['mask'] > 0
            xs.append(np.asarray(features(params, batch['images']))[keep])
            ys.append(batch['labels'][keep])
        return np.concatenate(xs), np.concatenate(ys)

    (tx, ty), (ex, ey) = split(config.train_split), split(config.eval_split)
    results = fewshot.fewshot_accuracies(tx, ty, ex, ey, 10, SHOTS, config.fewshot.l2_reg, config.fewshot.seeds)
    return {f'fewshot_{s}shot': float(np.mean(v)) for s, v in results.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='workdirs/self_supervised')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--pretrain-steps', type=int, default=600)
    parser.add_argument('--finetune-steps', type=int, default=200)
    args = parser.parse_args(argv)
    start = time.time()

    probes = {name: [] for name in ('random init', 'MPP', 'MAE')}
    finetuned = {name: [] for name in ('scratch', 'MPP', 'MAE')}
    for seed in args.seeds:
        encoders = {}
        for name, objective in (('MPP', 'masked_patch_prediction'), ('MAE', 'mae')):
            workdir = os.path.join(args.workdir, f'{name.lower()}_seed{seed}')
            probes[name].append(run(base(args.pretrain_steps, seed, objective), workdir))
            encoders[name] = workdir
            print(f'{name} pretraining, seed {seed}: {probes[name][-1]} ({time.time() - start:.0f} s)', flush=True)
        probes['random init'].append(random_init_fewshot(base(1, seed, 'supervised')))
        for name in finetuned:
            c = base(args.finetune_steps, seed, 'supervised')
            c.train_split = 'train[:10%]'
            if name != 'scratch':
                c.init_from.path = encoders[name]
            metrics = run(c, os.path.join(args.workdir, f'finetune_{name.lower()}_seed{seed}'))
            finetuned[name].append(metrics['eval_top1'])
            print(f'fine-tune from {name}, seed {seed}: top-1 {metrics["eval_top1"]:.4f} '
                  f'({time.time() - start:.0f} s)', flush=True)

    def cell(values):
        values = 100 * np.asarray(values)
        return f'{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}'

    lines = [f'(a) Linear few-shot top-1 (%) on the 360 test digits, frozen encoders ({args.pretrain_steps} '
             'pretraining steps of 128 images)', '', '| encoder | ' + ' | '.join(f'{s}-shot' for s in SHOTS) + ' |',
             '|---|' + '---|' * len(SHOTS)]
    for name, runs in probes.items():
        lines.append(f'| {name} | ' + ' | '.join(cell([r[f"fewshot_{s}shot"] for r in runs]) for s in SHOTS) + ' |')
    lines += ['', f'(b) Fine-tuned with the labels of 10% of the training images ({args.finetune_steps} steps): '
              'test top-1 (%)', '', '| initialisation | top-1 |', '|---|---|']
    for name, runs in finetuned.items():
        lines.append(f'| {name} | {cell(runs)} |')
    lines += ['', f'Mean ± std over seeds {args.seeds} (pretraining and fine-tuning seed); {time.time() - start:.0f} s '
              'in all.']
    table = '\n'.join(lines)
    print(table)
    with open(os.path.join(args.workdir, 'results.md'), 'w') as f:
        f.write(table + '\n')
    with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
        json.dump({'seeds': args.seeds, 'probes': probes, 'finetuned_top1': finetuned}, f, indent=2)


if __name__ == '__main__':
    main()
