"""python -m vit_jax.aot: compile a config's train and eval steps for a TPU or GPU topology, on this CPU.

    python -m vit_jax.aot --config configs/vit_b16.py --topology v5p-64 [--config.field=value ...] [--json OUT]
    python -m vit_jax.aot --config configs/deit_b16.py --topology h100x8 --config.model.dtype=bfloat16
    python -m vit_jax.aot --config configs/vit_b16.py --topology v5e-16 --plan          # search layouts that fit
    python -m vit_jax.aot --config ... --topology ... --save step.aot  # then: vit_jax.main --compiled step.aot
    python -m vit_jax.aot --install tpu                                # or gpu: the compilers, once
    python -m vit_jax.aot --list                                       # topologies and chips

Options: ``--num-slices N`` (TPU multi-slice: the data axis crosses slices), ``--num-hosts N`` (GPU hosts),
``--no-remedies`` (a config that does not fit is only reported), ``--plan-budget N`` (compiles for --plan).
The compile runs in a process with the compiler's prefix (``vit_jax/aot/compilers.py``); this one only parses the
topology, so a wrong name or a missing compiler is one line, before anything loads.
"""

from __future__ import annotations

import argparse
import os
import sys

CHILD = 'VIT_JAX_AOT_CHILD'


def _parent(argv: list[str]) -> int:
    from vit_jax.aot import compilers, targets
    parser = argparse.ArgumentParser(prog='python -m vit_jax.aot', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--config', help='a config file in configs/ (NAME.py[:arg]), as vit_jax.main takes it')
    parser.add_argument('--topology', help='e.g. v5p-64, v5e-4, v4-8, v6e-16, h100x8, a100x1')
    parser.add_argument('--num-slices', type=int, default=1, help='TPU slices (multi-slice; the data axis '
                        'crosses them)')
    parser.add_argument('--num-hosts', type=int, default=1, help='GPU hosts of --topology\'s GPUs each')
    parser.add_argument('--json', help='also write the report as JSON here')
    parser.add_argument('--save', help='write the compiled train and eval steps here (vit_jax.main --compiled)')
    parser.add_argument('--plan', action='store_true', help='search mesh x remat x micro-batches for the fastest '
                        'estimated step that fits')
    parser.add_argument('--plan-budget', type=int, default=24, help='at most this many compiles for --plan')
    parser.add_argument('--no-remedies', action='store_true', help='report a config that does not fit, without '
                        'compiling remedies')
    parser.add_argument('--install', choices=compilers.KINDS, help='install a compiler into its own prefix')
    parser.add_argument('--list', action='store_true', help='list the topologies and chips')
    parser.add_argument('--verbose', action='store_true', help='on an error, the traceback too')
    args, rest = parser.parse_known_args(argv)
    if args.install:
        compilers.install(args.install)
        print(f'{args.install.upper()} compiler installed in {compilers.prefix(args.install)}')
        return 0
    if args.list:
        print('Topologies: ' + '; '.join(targets.known_names()))
        for key, chip in targets.CHIPS.items():
            print(f'  {key:10} {chip.name:16} {chip.memory_bytes / 2 ** 30:6.1f} GiB  {chip.bf16_flops / 1e12:5.0f} '
                  f'TFLOP/s bf16  {chip.memory_bandwidth / 1e9:5.0f} GB/s')
        return 0
    overrides, unknown = [], []
    while rest:  # --config.field=value or --config.field value, as vit_jax.main takes them
        token = rest.pop(0)
        if token.startswith('--config.') and '=' not in token and rest:
            overrides.append(f'{token}={rest.pop(0)}')
        else:
            (overrides if token.startswith('--config.') else unknown).append(token)
    if unknown:
        parser.error(f'unrecognised arguments: {" ".join(unknown)}')
    if not args.topology or not args.config:
        parser.error('give --config and --topology (or --install, --list)')
    try:
        topology = targets.parse(args.topology, args.num_slices, args.num_hosts)
        compilers.require(topology.platform)
    except (ValueError, compilers.MissingCompiler) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    child = ['-m', 'vit_jax.aot', f'--topology={args.topology}', f'--num_slices={args.num_slices}',
             f'--num_hosts={args.num_hosts}', f'--plan_budget={args.plan_budget}',
             *([f'--json={args.json}'] if args.json else []), *([f'--save={args.save}'] if args.save else []),
             *(['--plan'] if args.plan else []), *(['--noremedies'] if args.no_remedies else []),
             *(['--verbose'] if args.verbose else []), f'--config={args.config}', *overrides]
    return compilers.run(topology.platform, child, extra_env={CHILD: '1'}).returncode


def _child() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file('config', None, 'A config file in configs/ (NAME.py[:arg]).', lock_config=True)
    flags.DEFINE_string('topology', None, 'The target.')
    flags.DEFINE_integer('num_slices', 1, 'TPU slices.')
    flags.DEFINE_integer('num_hosts', 1, 'GPU hosts.')
    flags.DEFINE_string('json', None, 'Report as JSON.')
    flags.DEFINE_string('save', None, 'Serialized executables.')
    flags.DEFINE_bool('plan', False, 'Search layouts.')
    flags.DEFINE_integer('plan_budget', 24, 'Compiles for --plan.')
    flags.DEFINE_bool('remedies', True, 'Compile remedies for a config that does not fit.')
    flags.DEFINE_bool('verbose', False, 'Tracebacks.')
    FLAGS = flags.FLAGS

    def main(argv):
        from absl import logging
        from vit_jax import console
        if len(argv) > 1:
            raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
        logging.set_verbosity(logging.WARNING)  # the report is the output; TFDS's and XLA's INFO lines are not
        logging.get_absl_handler().addFilter(console.LibraryNoise())
        try:
            return _compile_and_report(FLAGS)
        except ValueError as e:  # a config value, a mesh that does not fit the topology: one message
            if console.verbose_requested(FLAGS.verbose):
                raise
            print(console.one_line_error('python -m vit_jax.aot', e), file=sys.stderr)
            return 1

    app.run(main)


def _compile_and_report(FLAGS) -> int:
    import json

    from vit_jax.aot import compile as aot_compile, report, targets
    from vit_jax.train.validate import validate_config
    config = FLAGS.config
    validate_config(config)
    topology = targets.parse(FLAGS.topology, FLAGS.num_slices, FLAGS.num_hosts)
    devices = aot_compile.topology_devices(topology)
    compiled = aot_compile.compile_config(config, topology, devices, keep_executables=bool(FLAGS.save))
    print(report.format_report(compiled), flush=True)
    result = compiled.to_json()
    if not compiled.fits and FLAGS.remedies and not FLAGS.plan:
        print('Remedies, each compiled:', flush=True)
        attempts = report.remedies(config, topology, devices, log=lambda s: print(s, flush=True))
        result['remedies'] = [{'overrides': a.overrides, 'fits': a.fits,
                               'peak_bytes': a.compiled.peak_bytes if a.compiled else None, 'error': a.error}
                              for a in attempts]
        if attempts and attempts[-1].fits:
            print(f'Fits with: {report.as_flags(attempts[-1].overrides)}')
        else:
            print('No remedy tried fits: use a larger topology (more chips) or a smaller model.')
    if FLAGS.plan:
        print(f'Plan: layouts compiled for {topology.name}, at most {FLAGS.plan_budget}:', flush=True)
        heads = int(config.model.num_heads or __import__('vit_jax').models.model_info(
            config.model_name).defaults.get('num_heads', 12))
        fitting = report.plan(config, topology, devices, heads, FLAGS.plan_budget,
                              log=lambda s: print(s, flush=True), compiled=compiled)
        result['plan'] = [{'overrides': a.overrides, 'peak_bytes': a.compiled.peak_bytes,
                           'estimate': a.compiled.estimate()} for a in fitting]
        print('Best layouts (estimated step time, fastest first):' if fitting else 'No layout searched fits.')
        for a in fitting[:3]:
            e = a.compiled.estimate()
            print(f'  {e["step_seconds"] * 1e3:8.1f} ms  {report.gib(a.compiled.peak_bytes)} peak  '
                  f'{report.as_flags(a.overrides)}')
    if FLAGS.save:
        from vit_jax.aot import saved
        saved.save(FLAGS.save, compiled)
        print(f'Saved the compiled steps to {FLAGS.save} (python -m vit_jax.main --compiled {FLAGS.save} on '
              f'{topology.name})')
    if FLAGS.json:
        with open(FLAGS.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == '__main__':
    if os.environ.get(CHILD) == '1':
        _child()
    else:
        sys.exit(_parent(sys.argv[1:]))
