"""Many hosts: JAX's multi-controller runtime (the same program on every host, one global mesh, per-host data).

    initialize(coordinator_address, num_processes, process_id)   # --distributed; None: the environment's values
    with PreemptionWatch() as preempted:                          # SIGTERM to any process ...
        ...; if preempted(step): save and stop                    # ... every process saves and stops at one step

Off a managed cluster (Cloud TPU, SLURM, Open MPI, Kubernetes: JAX finds the values there itself) give the
coordinator ``HOST:PORT`` (process 0's host), the process count and this process's id, as flags or as
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. On CPU the processes' collectives go
through gloo over TCP, JAX's default in this version (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import os
import signal
import jax

ADDRESS_ENV, COUNT_ENV, ID_ENV = 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ''):
        return None
    try:
        return int(value)
    except ValueError:
        what = 'number of processes' if name == COUNT_ENV else 'id of this process'
        raise ValueError(f'${name}={value!r} is not an integer: set it to the {what}.') from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` with the flags' values, else the environment's, else the cluster's (auto)."""
    address = coordinator_address or os.environ.get(ADDRESS_ENV) or None
    count = num_processes if num_processes is not None else _env_int(COUNT_ENV)
    index = process_id if process_id is not None else _env_int(ID_ENV)
    if count is not None and count < 1:
        raise ValueError(f'--num_processes={count}: give the number of processes of the job (1 or more).')
    if index is not None and count is not None and not 0 <= index < count:
        raise ValueError(f'--process_id={index} is not in 0..{count - 1} (--num_processes={count}): give each process '
                         f'its own id, 0 on the coordinator\'s host.')
    if address is not None and ':' not in address:
        raise ValueError(f'--coordinator_address={address!r} has no port: give HOST:PORT of process 0, e.g. '
                         f'{address}:1234.')
    try:
        jax.distributed.initialize(address, count, index)
    except ValueError as e:  # JAX found no cluster and some value is missing: name the flags that give it
        raise ValueError(f'--distributed: {e} Off Cloud TPU / SLURM / Open MPI / Kubernetes, give --coordinator_address='
                         f'HOST:PORT (process 0\'s host), --num_processes=N and --process_id=I on each host (or '
                         f'${ADDRESS_ENV}, ${COUNT_ENV}, ${ID_ENV}).') from None


def _sync_manager():
    from jax._src import distributed as state  # the runtime JAX started in initialize(); None when it did not
    return state.global_state.preemption_sync_manager if state.global_state.client is not None else None


class PreemptionWatch:
    """``preempted(step)`` -> whether to save at ``step`` and stop: True at one and the same step in every process.

    One process: a SIGTERM handler sets a flag, so it saves after the step in flight. Many (``--distributed``): the
    runtime's own SIGTERM notifier tells every process, and ``reached_preemption_sync_point`` names the first step all
    of them have yet to pass (a flag per process would let one host save and stop while the others keep stepping,
    and hang in their next collective). It must then be called at every step, by every process, with the same steps.
    """

    def __init__(self):
        self._flag: list[bool] = []
        self._previous = None
        self._manager = None

    def start(self) -> 'PreemptionWatch':
        self._manager = _sync_manager()
        if self._manager is None:  # a Python handler here would replace the runtime's notifier in the other case
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.append(True))
        return self

    __enter__ = start

    def __call__(self, step: int) -> bool:
        if self._manager is not None:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self._flag)

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __exit__(self, *exc) -> None:
        self.stop()
