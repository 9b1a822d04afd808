"""DeiT's table 3 in miniature: a CNN teacher, then ViT students with no, soft, hard and token distillation.

    python experiments/distillation.py --workdir workdirs/distillation [--seeds 0 1 2] [--steps 300]

On the bundled digits (1,437 training, 360 test images at 16 px): a BiT ResNet teacher (two stages, half width) is
trained first; then quickstart-sized students (4 layers, width 96, 4 x 4 patches) with
- ``none``: ``deit_ti16``-shaped, labels only (``objective='supervised'``);
- ``soft``: the same student, DeiT's "usual distillation" through its one head (the paper's preset: tau 3, lambda
  0.1, KL per image);
- ``hard``: the same student, hard distillation through its one head (alpha 0.5);
- ``hard + token``: ``deit_ti16_distilled``, hard distillation on the distillation token, eval on both heads' mean
  (DeiT⚗);
on all the training images and on the first 20% of them, with each seed. Every run is a ``vit_jax.main`` workdir
under ``--workdir``; rerunning skips finished ones. Prints the table (mean and std of eval top-1 over seeds) and
writes it to ``WORKDIR/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

from vit_jax.train.config import load_config  # noqa: E402
from vit_jax.train.loop import train_and_evaluate  # noqa: E402

QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')
STUDENT = dict(patch_size=4, hidden_size=96, num_layers=4, num_heads=3, mlp_dim=192, drop_path_rate=0.1)
VARIANTS = {  # name: (model, objective, distillation fields)
    'none': ('deit_ti16', 'supervised', {}),
    'soft': ('deit_ti16', 'distillation', dict(preset='paper')),
    'hard': ('deit_ti16', 'distillation', dict(type='hard', alpha=0.5)),
    'hard + token': ('deit_ti16_distilled', 'distillation', dict(type='hard', alpha=0.5)),
}
SPLITS = {'100%': 'train', '20%': 'train[:20%]'}


def base(steps: int, seed: int, split: str):
    c = load_config(QUICKSTART)
    c.total_steps = steps
    c.optimizer.warmup_steps = steps // 10
    c.train_split = split
    c.seed = seed
    c.log_every = 25
    c.eval_every = c.checkpoint_every = steps
    return c


def run(config, workdir: str) -> dict:
    done = os.path.join(workdir, 'DONE')
    if os.path.exists(done):  # finished before: its final eval
        with open(done) as f:
            return json.load(f)
    return train_and_evaluate(config, workdir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='workdirs/distillation')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--steps', type=int, default=300, help='student steps (batch 128)')
    parser.add_argument('--teacher-steps', type=int, default=600)
    args = parser.parse_args(argv)
    start = time.time()

    teacher_dir = os.path.join(args.workdir, 'teacher')
    t = base(args.teacher_steps, 0, 'train')
    t.model_name = 'resnet26'
    for field in t.model.keys():
        t.model[field] = None
    t.model.update(resnet_layers=(2, 2), resnet_width=0.5)
    teacher = run(t, teacher_dir)
    print(f'teacher (BiT ResNet, 2 stages, width 0.5): eval top-1 {teacher["eval_top1"]:.4f}', flush=True)

    results = {}
    for data, split in SPLITS.items():
        for name, (model, objective, fields) in VARIANTS.items():
            for seed in args.seeds:
                c = base(args.steps, seed, split)
                c.model_name = model
                c.model.update(STUDENT)
                c.objective = objective
                c.distillation.teacher.path = teacher_dir
                c.distillation.update(fields)
                tag = f'{name.replace(" + ", "_")}_{data.rstrip("%")}_seed{seed}'
                metrics = run(c, os.path.join(args.workdir, tag))
                results.setdefault(data, {}).setdefault(name, []).append(metrics['eval_top1'])
                print(f'{data:>4} {name:<13} seed {seed}: eval top-1 {metrics["eval_top1"]:.4f} '
                      f'({time.time() - start:.0f} s)', flush=True)

    lines = [f'Teacher: BiT ResNet (2 stages, width 0.5), {args.teacher_steps} steps: '
             f'{100 * teacher["eval_top1"]:.1f}% top-1 on the 360 test digits.', '',
             f'| student ({args.steps} steps) | ' + ' | '.join(f'{d} of the training set' for d in SPLITS) + ' |',
             '|---|' + '---|' * len(SPLITS)]
    for name in VARIANTS:
        cells = []
        for data in SPLITS:
            top1 = 100 * np.array(results[data][name])
            cells.append(f'{top1.mean():.1f} ± {top1.std(ddof=1) if len(top1) > 1 else 0.0:.1f}')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    lines.append(f'Eval top-1 (%), mean ± std over seeds {args.seeds}; {time.time() - start:.0f} s in all.')
    table = '\n'.join(lines)
    print(table)
    with open(os.path.join(args.workdir, 'results.md'), 'w') as f:
        f.write(table + '\n')
    with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
        json.dump({'teacher_top1': teacher['eval_top1'], 'seeds': args.seeds, 'steps': args.steps,
                   'teacher_steps': args.teacher_steps, 'top1': results}, f, indent=2)


if __name__ == '__main__':
    main()
