"""Compiles cases for a TPU or GPU topology in the compiler's own process: ``python tests/aot_worker.py IN OUT``.

Started by tests/test_aot.py through ``vit_jax.aot.compilers.run`` (the compiler's prefix on the path, nothing of
it in the test process). IN is a JSON list of cases ``{name, config, overrides, topology, num_slices, eval,
save}``; OUT gets one JSON object per case name: the report of ``vit_jax.aot.compile`` plus what the compiled HLO
holds (cuDNN fused-attention calls, calls into the CPU kernels), or the error it raised.
"""

import json
import sys
import time
import traceback

from vit_jax.aot import compile as aot_compile, report, saved, targets
from vit_jax.train.config import load_config


def run_case(case: dict) -> dict:
    config = report.with_overrides(load_config(case['config']), case.get('overrides', {}))
    topology = targets.parse(case['topology'], case.get('num_slices', 1))
    devices = aot_compile.topology_devices(topology)
    start = time.perf_counter()
    compiled = aot_compile.compile_config(config, topology, devices, keep_executables=True,
                                          eval_step=case.get('eval', True))
    result = compiled.to_json()
    result['seconds'] = time.perf_counter() - start
    for step, executable in (('train', compiled.train_executable), ('eval', compiled.eval_executable)):
        text = executable.as_text() if executable is not None else ''
        result[step]['cudnn_attention_calls'] = text.count('__cudnn$fmha')
        result[step]['cpu_kernel_calls'] = text.count('vit_attention_') + text.count('vit_gemm_')
    if case.get('remedies'):
        attempts = report.remedies(config, topology, devices, log=lambda s: None)
        result['remedies'] = [{'overrides': a.overrides, 'fits': a.fits,
                               'peak_bytes': a.compiled.peak_bytes if a.compiled else None} for a in attempts]
    if case.get('save'):
        saved.save(case['save'], compiled)
    return result


def main(path_in: str, path_out: str) -> None:
    results = {}
    for case in json.load(open(path_in)):
        try:
            results[case['name']] = run_case(case)
        except Exception as e:  # noqa: BLE001 - reported per case, the test names it
            results[case['name']] = {'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc()[-3000:]}
        with open(path_out, 'w') as f:  # after every case: a timeout still leaves the finished ones
            json.dump(results, f, default=str)


if __name__ == '__main__':
    main(*sys.argv[1:3])
