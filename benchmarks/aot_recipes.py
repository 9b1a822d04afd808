"""Every shipped recipe compiled for the hardware its source trained on (or the smallest current slice it fits), at
its recipe's global batch, on this CPU: the table of benchmarks/aot_recipes.md. Run by hand (not in CI: the ViT-B
compiles take minutes on a 2-core machine), with the compilers installed (`make aot-compilers`):

    python benchmarks/aot_recipes.py [--only vit_b16,deit_b16] [--out benchmarks/aot_recipes]

Each recipe is compiled in bf16 with the blocks scanned (``model.scan_layers=True``: one layer compiled, the same
memory plan per layer) through ``python -m vit_jax.aot``, which prints the full report; this script keeps each JSON
and writes the table. Where a recipe does not fit, the command's first fitting remedy is what the table lists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = ['--config.model.dtype=bfloat16', '--config.model.scan_layers=True']
TEACHER = ['--config.distillation.teacher.model_name=deit_b16', '--config.distillation.teacher.path=/tmp/teacher.npz']
# recipe -> (topology, why): the source's hardware or its current equivalent.
RECIPES = {
    'vit_b16': ('v5p-64', 'ViT paper: ImageNet-21k pre-training at batch 4096 on a TPUv3 pod'),
    'r50_vit_b16': ('v5p-64', 'ViT paper: the hybrid, as ViT-B/16'),
    'mpp_vit_b16': ('v5p-64', 'ViT paper appendix B.1.2: batch 4096'),
    'mae_vit_b16': ('v5p-64', 'MAE: batch 4096 on TPU-v3 (128 cores)'),
    'vit_s16': ('v5e-16', 'big_vision i1k ViT-S/16: batch 1024 on TPUv3-8'),
    'vit_ti16': ('v5e-16', 'big_vision i1k recipe, batch 1024'),
    'finetune_vit_b16': ('v5e-16', 'ViT fine-tuning at 384 px, batch 512'),
    'finetune_from_mpp': ('v5e-16', 'as finetune_vit_b16'),
    'deit_b16': ('h100x8', 'DeiT: batch 1024 on one 8-GPU node'),
    'deit_s16': ('h100x8', 'DeiT'),
    'deit_b16_distilled': ('h100x8', 'DeiT with a teacher beside the student (teacher: DeiT-B here)'),
    'deit_s16_distilled': ('h100x8', 'DeiT'),
    'deit_ti16_distilled': ('h100x8', 'DeiT'),
    'finetune_deit_b16_384': ('h100x8', 'DeiT fine-tuning at 384 px, batch 512'),
    'finetune_from_mae': ('h100x8', 'MAE fine-tuning: batch 1024'),
    't2t_vit_14': ('h100x8', 'T2T-ViT: batch 512 on 8 GPUs'),
}


# Recipes whose eval batch (1000: ImageNet's 50,000 in 50 batches) does not split over the slice's chips.
EVAL_BATCH = {'vit_s16': 1024, 'vit_ti16': 1024, 'mae_vit_b16': 1024}


def run(name: str, topology: str, out: pathlib.Path) -> dict:
    pathlib.Path('/tmp/teacher.npz').touch()
    path = out / f'{name}.json'
    extra = [f'--config.eval_batch_size={EVAL_BATCH[name]}'] if name in EVAL_BATCH else []
    command = [sys.executable, '-m', 'vit_jax.aot', '--config', f'configs/{name}.py', '--topology', topology,
               '--json', str(path), *COMMON, *extra, *(TEACHER if 'distilled' in name else [])]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(result.stdout, result.stderr[-2000:] if result.returncode else '', flush=True)
    if result.returncode or not path.exists():
        return {'name': name, 'topology': topology, 'error': result.stderr.strip().splitlines()[-1:]}
    report = json.loads(path.read_text())
    report.update(name=name, wall_seconds=seconds, command=' '.join(command[2:]).replace(str(out) + '/', ''))
    path.write_text(json.dumps(report, indent=1, default=str))
    return report


def row(r: dict) -> str:
    if 'error' in r:
        return f'| {r["name"]} | {r["topology"]} | error: {" ".join(r["error"])} ||||||'
    gib = max(r['train']['total_bytes'], r['eval']['total_bytes']) / 2 ** 30
    fits = 'yes' if r['fits'] else 'no'
    remedy = next((x for x in r.get('remedies', []) if x['fits']), None)
    if remedy:
        fits += ', with ' + ' '.join(f'{k}={v}' for k, v in remedy['overrides'].items())
    e = r['estimate']
    speed = '-' if e['images_per_second'] != e['images_per_second'] else f'{e["images_per_second"]:,.0f}'
    mfu = '-' if e['mfu'] != e['mfu'] else f'{e["mfu"]:.0%}'
    collectives = ', '.join(f'{k} {v["count"]}' for k, v in r['train']['collectives'].items() if v['count']) or '-'
    mesh = 'x'.join(str(r['mesh'][a]) for a in ('data', 'fsdp', 'tensor'))
    return (f'| {r["name"]} | {r["topology"]} ({r["devices"]} x {r["chip"]}) | {r["batch_size"]} | {mesh} | '
            f'{gib:.2f} | {fits} | {speed} ({e.get("flops_source")}) | {mfu} | {collectives} | '
            f'{r["train"]["compile_seconds"] + r["eval"]["compile_seconds"]:.0f} |')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', default='', help='comma-separated recipe names')
    parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'aot_recipes'))
    parser.add_argument('--table-only', action='store_true', help='write the table from the JSONs in --out, '
                        'compiling nothing')
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in RECIPES if not args.only or n in args.only.split(',')]
    if args.table_only:
        names = [n for n in names if (out / f'{n}.json').exists()]
        rows = [row({**json.loads((out / f'{n}.json').read_text()), 'name': n}) for n in names]
    else:
        rows = [row(run(name, RECIPES[name][0], out)) for name in names]
    sys.path.insert(0, str(REPO))
    from vit_jax.kernels.build import cpu_model
    header = [f'Compiled on {datetime.date.today()} on {cpu_model()}, 2 cores; `python benchmarks/aot_recipes.py`.',
              f'Every recipe in bf16 with the blocks scanned ({" ".join(COMMON)}), at its global batch. Memory: the '
              'larger of the train and eval steps per device (XLA\'s plan). Images/s: the roofline estimate, an '
              'upper bound (compiled: XLA\'s FLOPs and bytes; model: 3 x the analytic forward FLOPs against the '
              'peak, since the scanned program\'s cost analysis counts one layer). MFU where XLA\'s counts apply. '
              'Compile s: the train and eval compiles\' wall time here, with other jobs on the same 2 cores for '
              'some recipes: not a benchmark.',
              '', '| recipe | topology | batch | mesh (data x fsdp x tensor) | GiB per device | fits | images/s '
              '(estimate) | MFU | collectives per step | compile s |', '|' + '---|' * 10]
    (out.parent / 'aot_recipes.md').write_text('\n'.join(header + rows) + '\n')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
