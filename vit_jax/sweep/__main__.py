"""Runs every run of a sweep's grid, skips the finished ones, resumes the interrupted ones, and plots the results.

    python -m vit_jax.sweep experiments/scaling.py --workdir workdirs/scaling [--parallel 2]
    python -m vit_jax.sweep experiments/scaling.py --workdir workdirs/scaling --report
    python -m vit_jax.sweep experiments/scaling.py:paper --workdir /shared/scaling --executor slurm \\
        --partition gpu --gpus-per-node 8 --timeout-min 4320
    python -m vit_jax.sweep experiments/scaling.py:paper --workdir gs://bucket/scaling --emit-commands

Each run is ``python -m vit_jax.main --config FILE[:arg] --workdir DIR/<name>.<id> --config.FIELD=VALUE ...`` (the
id: a hash of its sorted overrides). A run whose workdir holds ``DONE`` is skipped; a failed run is reported with the
end of its log and the sweep goes on (rerun the sweep to retry it). At the end (and with ``--report``):
``DIR/results.csv``, ``DIR/fits.json`` and the plots (see ``vit_jax.sweep.report``).
"""

from __future__ import annotations

import argparse
import os
import sys

from vit_jax.sweep.executors import Progress, emit_commands, run_local, run_slurm
from vit_jax.sweep.grid import SweepError, load_sweep
from vit_jax.sweep.runner import DONE, RunSpec, read_json, status, write_json


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m vit_jax.sweep', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('sweep', help='a sweep file, FILE[:arg] (get_config(arg) and get_hyper(hyper, arg))')
    parser.add_argument('--workdir', required=True, help='the sweep directory: a workdir per run under it')
    parser.add_argument('--executor', choices=('local', 'slurm'), default='local')
    parser.add_argument('--parallel', type=int, default=1, help='local: runs at a time')
    parser.add_argument('--emit-commands', action='store_true',
                        help='print one shell line per unfinished run and run nothing')
    parser.add_argument('--report', action='store_true', help='write results.csv, fits.json and plots; run nothing')
    parser.add_argument('--extend', action='store_true',
                        help='accept a grid that adds runs to the ones the workdir already holds')
    parser.add_argument('--no-flops', action='store_true', help="skip XLA's FLOP count of each model")
    slurm = parser.add_argument_group('slurm (through submitit)')
    slurm.add_argument('--cluster', choices=('slurm', 'local', 'debug'), default='slurm',
                       help="submitit's cluster: 'local' and 'debug' run the array here (tests, no cluster)")
    slurm.add_argument('--partition', default=None)
    slurm.add_argument('--gpus-per-node', type=int, default=None)
    slurm.add_argument('--cpus-per-task', type=int, default=None)
    slurm.add_argument('--mem-gb', type=int, default=None)
    slurm.add_argument('--timeout-min', type=int, default=60 * 24)
    slurm.add_argument('--array-parallelism', type=int, default=None, help='runs of the array at a time')
    slurm.add_argument('--no-wait', action='store_true', help='submit and exit; --report later')
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f'--parallel {args.parallel}: give at least 1.')
    return args


# What a sweep writes in its directory besides the runs' workdirs.
SWEEP_FILES = {'sweep.json', 'submitit', 'flops_cache', 'results.csv', 'fits.json', 'data_scaling.png',
               'compute_scaling.png', 'loss_curves.png'}


def check_workdir(workdir: str, sweep, extend: bool) -> dict[str, dict]:
    """The runs the workdir's ``sweep.json`` records, checked against this sweep; a SweepError where they differ."""
    runs = {run.dirname: run.as_dict() for run in sweep.runs}
    record_path = os.path.join(workdir, 'sweep.json')
    record = read_json(record_path)
    if record is None:
        for marker in ('metrics.jsonl', 'checkpoints', 'DONE'):
            if os.path.exists(os.path.join(workdir, marker)):
                raise SweepError(f'{workdir} is a training workdir (it holds {marker}), not a sweep directory: give '
                                 f'the sweep a directory of its own, e.g. --workdir {workdir.rstrip("/")}_sweep.')
        foreign = sorted(set(os.listdir(workdir) if os.path.isdir(workdir) else []) - set(runs) - SWEEP_FILES)
        if foreign:
            raise SweepError(f'{workdir} holds {foreign[:3]}{"..." if len(foreign) > 3 else ""}, which are not runs of '
                             f'this sweep, and no sweep.json: give the sweep a new or empty directory.')
        return runs
    recorded = record.get('runs', {})
    added, gone = sorted(set(runs) - set(recorded)), sorted(set(recorded) - set(runs))
    if record.get('sweep') != sweep.config or gone or (added and not extend):
        raise SweepError(
            f'{workdir} holds a different sweep: {record.get("sweep")} with {len(recorded)} runs; this is '
            f'{sweep.config} with {len(runs)} runs ({len(added)} not in the workdir, {len(gone)} of the workdir\'s '
            f'not in this grid{", e.g. " + gone[0] if gone else ""}). Give this sweep a new --workdir'
            + (', or pass --extend to add the new runs to this one.' if added and not gone
               and record.get('sweep') == sweep.config else '.'))
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        remote = '://' in args.workdir
        if remote and not args.emit_commands:
            raise SweepError(f'--workdir {args.workdir} is not on this machine: only --emit-commands can use it (the '
                             f'runs then write there themselves).')
        workdir = args.workdir if remote else os.path.abspath(args.workdir)
        runs = {run.dirname: run.as_dict() for run in sweep.runs} if remote else \
            check_workdir(workdir, sweep, args.extend)
    except SweepError as e:
        print(f'vit_jax.sweep: {e}', file=sys.stderr)
        return 2
    specs = [RunSpec(run.id, run.name, os.path.join(workdir, run.dirname), sweep.config, tuple(run.flags()),
                     run.overrides, os.getcwd()) for run in sweep.runs]

    if args.emit_commands:
        # A remote workdir cannot be read from here: every run is emitted (a finished one only reports its eval).
        if not remote:  # the runs will write here: --report later needs to know whose they are
            os.makedirs(workdir, exist_ok=True)
            write_json(os.path.join(workdir, 'sweep.json'), dict(sweep=sweep.config, runs=runs))
        for line in [s.shell_line() for s in specs] if remote else emit_commands(specs):
            print(line)
        return 0
    if args.report:
        return report(workdir, runs, not args.no_flops)

    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, 'sweep.json'), dict(sweep=sweep.config, runs=runs))
    todo = [s for s in specs if status(s.workdir) != DONE]
    print(f'{sweep.config}: {len(specs)} runs in {workdir}; {len(specs) - len(todo)} finished already (skipped), '
          f'{len(todo)} to run ({args.executor}).', flush=True)
    progress = Progress(total=len(specs), done=len(specs) - len(todo))
    if args.executor == 'local':
        results = run_local(todo, progress, args.parallel)
    else:
        parameters = dict(timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_node,
                          cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, slurm_partition=args.partition,
                          slurm_array_parallelism=args.array_parallelism)
        results = run_slurm(todo, progress, os.path.join(workdir, 'submitit'),
                            None if args.cluster == 'slurm' else args.cluster,
                            {k: v for k, v in parameters.items() if v is not None}, wait=not args.no_wait)
        if args.no_wait:
            return 0
    progress.show('Sweep finished.')
    report(workdir, runs, not args.no_flops)
    failed = [r for r in results if r['status'] != DONE]
    if failed:
        print(f'{len(failed)} run(s) failed: {", ".join(r["id"] for r in failed)}; rerun the same command to retry '
              f'them (finished runs are skipped).', file=sys.stderr)
    return 1 if failed else 0


def report(workdir: str, runs: dict[str, dict], count_flops: bool) -> int:
    from vit_jax.sweep.report import write_report
    paths = write_report(workdir, runs, count_flops, os.getcwd())
    print('Report: ' + '  '.join(paths.values()), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
