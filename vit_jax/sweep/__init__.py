"""Scaling studies: grids of training runs (model x data x compute), run here or on a cluster, with the ViT paper's
plots and saturating power-law fits.

    python -m vit_jax.sweep experiments/scaling.py --workdir workdirs/scaling --parallel 2

A sweep file is a config file with a grid beside it (``get_config(arg)``, ``get_hyper(hyper, arg)``, as big_vision);
see ``vit_jax.sweep.grid``. Executors: ``vit_jax.sweep.executors``; results and plots: ``vit_jax.sweep.report``.
"""

from vit_jax.sweep.grid import Run, Sweep, SweepError, fixed, hyper, load_sweep, product, sweep, zipit
from vit_jax.sweep.report import fit_power_law, pareto_frontier, power_law

__all__ = ['Run', 'Sweep', 'SweepError', 'fit_power_law', 'fixed', 'hyper', 'load_sweep', 'pareto_frontier',
           'power_law', 'product', 'sweep', 'zipit']
