"""Where the runs of a sweep run: here one after another or N at a time (``local``), as one SLURM array job through
submitit (``slurm``; submitit's ``local`` and ``debug`` clusters test the same path without a cluster), or nowhere:
``emit_commands`` prints one shell line per unfinished run for any other scheduler (TPU VMs' ``gcloud ... ssh
--worker=all --command=...``)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable

from vit_jax.sweep.runner import DONE, FAILED, RunSpec, run_one, status, stop_all


@dataclasses.dataclass
class Progress:
    """Runs done / running / failed / left and an ETA from the mean time of the runs finished in this session."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    parallel: int = 1
    started_at: float = dataclasses.field(default_factory=time.time)
    walls: list[float] = dataclasses.field(default_factory=list)
    out: Any = None  # None: sys.stdout at the time of printing
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def left(self) -> int:
        return self.total - self.done - self.failed - self.running

    def eta_s(self) -> float | None:
        if not self.walls:
            return None
        mean = sum(self.walls) / len(self.walls)
        return mean * (self.left + self.running) / max(self.parallel, 1)

    def line(self) -> str:
        eta = self.eta_s()
        eta_text = 'ETA unknown (no run finished yet)' if eta is None else f'ETA {_duration(eta)}'
        return (f'[sweep {time.strftime("%H:%M:%S")}] {self.done}/{self.total} done, {self.running} running, '
                f'{self.failed} failed, {self.left} left; {eta_text} '
                f'(elapsed {_duration(time.time() - self.started_at)})')

    def show(self, message: str = '') -> None:
        with self.lock:
            out = self.out or sys.stdout
            if message:
                print(message, file=out)
            print(self.line(), file=out, flush=True)

    def finished(self, spec: RunSpec, result: dict[str, Any]) -> None:
        with self.lock:
            self.running -= 1
            if result['status'] == DONE:
                self.done += 1
                self.walls.append(result['wall_s'])
            else:
                self.failed += 1
        if result['status'] == DONE:
            self.show(f'done   {spec.name} ({spec.id}) in {_duration(result["wall_s"])}')
        else:
            tail = '\n'.join('    | ' + line for line in result.get('log_tail', '').rstrip().splitlines())
            self.show(f'FAILED {spec.name} ({spec.id}), exit code {result["returncode"]}; the end of '
                      f'{spec.workdir}/log.txt:\n{tail}\n  (the sweep goes on; rerun it to retry this run)')


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
    return f'{seconds // 60}m{seconds % 60:02d}s'


def run_local(specs: list[RunSpec], progress: Progress, parallel: int = 1,
              run: Callable[[RunSpec], dict[str, Any]] = run_one) -> list[dict[str, Any]]:
    """Runs the unfinished runs here, ``parallel`` at a time; a failed run is reported and the others go on."""
    progress.parallel = parallel
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        def start(spec):
            with progress.lock:
                progress.running += 1
            progress.show(f'start  {spec.name} ({spec.id}): {spec.shell_line(python="python")}')
            try:
                result = run(spec)
            except Exception as e:  # noqa: BLE001 (one run's trouble never stops the sweep)
                result = dict(id=spec.id, status=FAILED, returncode=None, wall_s=0.0,
                              log_tail=f'{type(e).__name__}: {e}')
            progress.finished(spec, result)
            return result

        futures = [pool.submit(start, spec) for spec in specs]
        try:
            for future in futures:
                results.append(future.result())
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            stop_all()  # the runs save a checkpoint on SIGTERM: rerunning the sweep resumes them
            raise
    return results


def run_slurm(specs: list[RunSpec], progress: Progress, folder: str, cluster: str | None = None,
              parameters: dict[str, Any] | None = None, wait: bool = True, poll_s: float = 10.0,
              ) -> list[dict[str, Any]]:
    """One array job of the unfinished runs through submitit (the launcher of DeiT and MAE).

    ``cluster``: None (SLURM, found on the machine), 'local' (submitit runs the jobs as processes here) or 'debug'
    (in this process, one after another): the last two test this path without a cluster. ``parameters`` go to
    ``AutoExecutor.update_parameters`` (``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``,
    ``slurm_partition``, ``slurm_array_parallelism``, ...).
    """
    import submitit
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters = dict(parameters or {})
    if executor.cluster != 'slurm':  # slurm_* parameters mean nothing to the local and debug clusters
        parameters = {k: v for k, v in parameters.items() if not k.startswith('slurm_')}
    executor.update_parameters(name='vit_jax_sweep', **parameters)
    jobs = executor.map_array(run_one, specs)
    print(f'Submitted {len(jobs)} runs as array job {jobs[0].job_id.split("_")[0] if jobs else "-"} '
          f'({executor.cluster}); submitit logs in {folder}.', flush=True)
    if not wait:
        return []
    with progress.lock:
        progress.running = len(jobs)
    results: dict[int, dict[str, Any]] = {}
    last_line = time.time()
    while len(results) < len(jobs):
        for i, (job, spec) in enumerate(zip(jobs, specs)):
            if i in results or not job.done():
                continue
            try:
                result = job.result()
            except Exception as e:  # noqa: BLE001 (the job itself died: out of time, node failure)
                result = dict(id=spec.id, status=FAILED, returncode=None, wall_s=0.0,
                              log_tail=f'{type(e).__name__}: {str(e)[-2000:]}')
            results[i] = result
            progress.finished(spec, result)
        if len(results) < len(jobs):
            if time.time() - last_line > 60:
                progress.show()
                last_line = time.time()
            time.sleep(poll_s)
    return [results[i] for i in range(len(jobs))]


def emit_commands(specs: list[RunSpec], workdir: str | None = None, python: str = 'python') -> list[str]:
    """One shell line per unfinished run (a finished run's workdir holds DONE)."""
    lines = []
    for spec in specs:
        if status(spec.workdir) == DONE:
            continue
        lines.append(spec.shell_line(python, os.path.join(workdir, os.path.basename(spec.workdir))
                                     if workdir else None))
    return lines
