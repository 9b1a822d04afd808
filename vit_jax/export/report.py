"""The export report: ``export_report.json`` and the table the CLI prints. No JAX here."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from vit_jax.export import artefacts

ROWS = [  # (variant, label, file)
    ('jax', 'JAX (jit)', None),
    ('torch_eager', 'torch eager fp32', None),
    ('torchscript_fp32', 'TorchScript fp32', artefacts.FP32),
    ('int8_qnnpack', 'int8 qnnpack (TorchScript)', artefacts.INT8),
    ('int8_lite', 'int8 qnnpack (lite)', artefacts.LITE),
]


def write_report(report: Mapping[str, Any], path: str) -> None:
    with open(path, 'w') as f:
        json.dump(report, f, indent=2, default=str)
        f.write('\n')


def read_report(out_dir: str) -> dict[str, Any]:
    with open(os.path.join(out_dir, artefacts.REPORT)) as f:
        return json.load(f)


def _mb(n: int | None) -> str:
    return '' if n is None else f'{n / 2 ** 20:.2f}'


def format_table(report: Mapping[str, Any]) -> str:
    """One row per variant: file size, latency per image at batch 1, max |logits - JAX|, top-1 agreement with JAX."""
    files, latency = report['files'], report['latency_ms_per_image']
    diff, agree = report['max_abs_logit_diff'], report['top1_agreement']
    accuracy = report.get('top1_accuracy', {})
    header = f'{"variant":<28}{"file":<26}{"MiB":>8}{"ms/image":>10}{"max|Δlogit|":>13}{"top-1 agree":>13}'
    if accuracy:
        header += f'{"top-1 acc":>11}'
    lines = [header, '-' * len(header)]
    for key, label, file in ROWS:
        size = files[file]['bytes'] if file else None
        row = (f'{label:<28}{file or "":<26}{_mb(size):>8}{latency[key]:>10.2f}'
               f'{diff.get(key, 0.0):>13.2e}{agree.get(key, 1.0):>13.4f}')
        if accuracy:
            row += f'{accuracy.get(key, float("nan")):>11.4f}'
        lines.append(row)
    state = report['state_dict']
    lines.append(f'{"state dict (" + state["layout"] + " names)":<28}{artefacts.STATE_DICT:<26}'
                 f'{_mb(files[artefacts.STATE_DICT]["bytes"]):>8}   load_params round trip: {state["round_trip"]}')
    model = report['model']
    lines += ['',
              f'model: {model["name"]} ({model["family"]}, {model["num_params"]:,} parameters); '
              f'int8 / fp32 file size: {report["int8_vs_fp32_size"]:.3f}',
              f'compared on: {report["comparison"]["inputs"]} ({report["comparison"]["examples"]} images); latency: '
              f'median of {latency["repeats"]} round-robin runs at batch 1 after {latency["warmup"]} warm-up runs',
              f'threads: torch {report["threads"]["torch"]}, jax {report["threads"]["jax"]}; '
              f'torch {report["versions"]["torch"]}, jax {report["versions"]["jax"]}',
              f'1-minute load average before / after timing: {report["load_average"]} '
              f'(other jobs on these cores inflate latencies)',
              f'optimize_for_mobile: {report["optimize_for_mobile"]}']
    if 'note' in report:
        lines.append(f'note: {report["note"]}')
    return '\n'.join(lines)
