"""Scaling study: model size x training-set size x compute, the ViT paper's Fig. 3/4/5 in miniature.

    python -m vit_jax.sweep experiments/scaling.py --workdir workdirs/scaling --parallel 2

The default grid (40 runs) trains four ViT sizes (quickstart-like: 16 px digits, 4 x 4 patches, widths 32-96, depths
2-4) and the BiT ResNet-26 baseline (half width) on 10%, 25%, 50% and 100% of the bundled digits' 1,437 training
images, for 100 and 300 steps of 64 images, and reports top-1 on the 360 test digits. Measured: 46 minutes with
``--parallel 2`` on a 2-core AMD EPYC shared with other jobs (load average 8-11); most of each run is start-up and
compilation. Expected: the ResNet ahead of every ViT (90-96% vs 41-94%), the largest ViT at ~94% after 300 steps on
all the data. Its results are in ``experiments/results/scaling/`` (see the README's "Scaling studies").

The paper-scale grid (24 runs: ViT-Ti/S/B/L at patch 16 x 1.3M, 4M and all ~14M images of ImageNet-21k x 30 and 90
epochs, the recipe of the paper's section 4.1) is meant for a cluster::

    python -m vit_jax.sweep experiments/scaling.py:paper --workdir /shared/scaling --executor slurm \\
        --partition gpu --gpus-per-node 8 --timeout-min 4320
    python -m vit_jax.sweep experiments/scaling.py:paper --workdir gs://bucket/scaling --emit-commands
"""

import os

from vit_jax.train.config import base_config, load_config, vit_pretrain_recipe

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'configs', 'quickstart.py')

# ViT sizes on 16 px digits with 4 x 4 patches (16 patches + the class token): (width, depth, heads).
DIGITS_VITS = [(32, 2, 2), (48, 3, 3), (64, 4, 4), (96, 4, 3)]  # the last is the quickstart's ViT
DIGITS_FRACTIONS = ['train[:10%]', 'train[:25%]', 'train[:50%]', 'train']
DIGITS_STEPS = [100, 300]

# ImageNet-21k (big_vision holds out its first 51,200 images for eval): ~ImageNet-1k's size, ~4M, all.
I21K_SPLITS = ['full[51200:1331200]', 'full[51200:4051200]', 'full[51200:]']


def get_config(arg: str = ''):
    """The config every run starts from: the quickstart's digits recipe (default) or the paper's I21k recipe."""
    if arg == 'paper':
        c = vit_pretrain_recipe(base_config())
        c.model_name = 'vit_b16'
        return c
    if arg:
        raise ValueError(f"Unknown grid {arg!r} of experiments/scaling.py: '' (digits) or 'paper'.")
    c = load_config(QUICKSTART)
    for field in c.model.keys():  # each run names its model's sizes: a ResNet has none of a ViT's fields
        c.model[field] = None
    c.batch_size = 64  # half the quickstart's: the study's 40 runs fit 30 minutes of a 2-core CPU
    c.optimizer.warmup_steps = 20  # of runs of 100-300 steps (the quickstart's 100 are for 1,500)
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 100
    return c


def get_hyper(hyper, arg: str = ''):
    """The grid: model x data x steps."""
    if arg == 'paper':
        return hyper.product([
            hyper.sweep('model_name', ['vit_ti16', 'vit_s16', 'vit_b16', 'vit_l16']),
            hyper.sweep('train_split', I21K_SPLITS),
            hyper.sweep('num_epochs', [30.0, 90.0]),
        ])
    vits = len(DIGITS_VITS)
    models = hyper.zipit([
        hyper.sweep('model_name', ['vit_ti16'] * vits + ['resnet26']),
        hyper.sweep('model.patch_size', [4] * vits + [None]),
        hyper.sweep('model.hidden_size', [d for d, _, _ in DIGITS_VITS] + [None]),
        hyper.sweep('model.num_layers', [n for _, n, _ in DIGITS_VITS] + [None]),
        hyper.sweep('model.num_heads', [h for _, _, h in DIGITS_VITS] + [None]),
        hyper.sweep('model.mlp_dim', [2 * d for d, _, _ in DIGITS_VITS] + [None]),
        hyper.sweep('model.resnet_width', [None] * vits + [0.5]),  # 32 root channels: GroupNorm's 32 groups
    ])
    return hyper.product([
        models,
        hyper.sweep('train_split', DIGITS_FRACTIONS),
        hyper.sweep('total_steps', DIGITS_STEPS),
    ])
