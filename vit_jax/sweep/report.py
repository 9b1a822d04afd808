"""A sweep's results and the ViT paper's plots: ``results.csv``, ``fits.json`` and PNGs.

- ``data_scaling.png``: top-1 vs training-set size, a line per model (ViT paper Fig. 3/4), a panel per step budget.
- ``compute_scaling.png``: error (1 - top-1) vs training compute on log-log axes, per family, with each family's
  Pareto frontier and a saturating power law fitted to it (Zhai et al. 2022, eq. 1: ``E = a (C + d)^-b + c``).
- ``loss_curves.png``: the train loss and eval top-1 of every run against its steps.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_jax.sweep.runner import DONE, read_json, status, wall_seconds, write_flops, write_json

if TYPE_CHECKING:
    import pandas

MIN_FIT_POINTS = 5  # four parameters: fewer points than five fit noise, not a law


# The saturating power law --------------------------------------------------------------------------------------------
def power_law(c: np.ndarray, a: float, b: float, cc: float, d: float) -> np.ndarray:
    """Zhai et al. 2022 eq. 1: error ``a (C + d)^-b + c``, saturating at ``c`` as compute C grows."""
    return a * (c + d) ** (-b) + cc


def fit_power_law(compute: np.ndarray, error: np.ndarray) -> dict[str, Any]:
    """Least squares of log E (every point counts alike on log-log axes) for ``E = a (C + d)^-b + c``.

    Compute is rescaled to ``unit`` (a power of ten near the smallest C) so that the optimiser sees numbers near 1;
    ``a``, ``c`` and ``d`` are reported for C in FLOPs. Returns the parameters, their standard errors (from the
    covariance of the fit) and the RMS of the log residuals; or ``fit: None`` and the reason, where there are fewer
    than ``MIN_FIT_POINTS`` points or the fit does not converge.
    """
    from scipy.optimize import curve_fit
    compute, error = np.asarray(compute, float), np.asarray(error, float)
    keep = np.isfinite(compute) & np.isfinite(error) & (compute > 0) & (error > 0)
    compute, error = compute[keep], error[keep]
    n = len(compute)
    if n < MIN_FIT_POINTS:
        return dict(fit=None, points=n, reason=f'too few points for a fit: {n} < {MIN_FIT_POINTS} (four parameters)')
    unit = 10.0 ** math.floor(math.log10(compute.min()))
    x = compute / unit

    def log_model(x, a, b, c, d):
        return np.log(power_law(x, a, b, c, d))

    best = None
    for b0 in (0.1, 0.3, 0.6, 1.0):  # the fit has local minima: start from several exponents and offsets
        for d0 in (0.0, x.min()):
            a0 = max(error.max() - 0.5 * error.min(), 1e-6) * (x.min() + d0) ** b0
            p0 = [a0, b0, 0.5 * error.min(), d0]
            try:
                params, cov = curve_fit(log_model, x, np.log(error), p0=p0, maxfev=20_000,
                                        bounds=([0, 0, 0, 0], [np.inf, 10, error.min(), np.inf]))
            except (RuntimeError, ValueError):
                continue
            rms = float(np.sqrt(np.mean((log_model(x, *params) - np.log(error)) ** 2)))
            if best is None or rms < best[2] - 1e-12:
                best = (params, cov, rms)
    if best is None:
        return dict(fit=None, points=n, reason='the least-squares fit did not converge')
    (a, b, c, d), cov, rms = best
    stderr = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(4, np.inf)
    # Back to FLOPs: a (x + d)^-b = a unit^b (C + d unit)^-b.
    # A parameter whose standard error exceeds it is not pinned down by these points (typically: few of them, or
    # no curvature to tell the offset d from the floor c): the curve then describes the points, not a law.
    constrained = bool(np.all(stderr < np.abs([a, b, c, d])))
    return dict(fit='E = a (C + d)^-b + c', points=n, constrained=constrained, compute_unit_flops=unit,
                a=float(a * unit ** b), b=float(b), c=float(c), d=float(d * unit),
                stderr=dict(a=float(stderr[0] * unit ** b), b=float(stderr[1]), c=float(stderr[2]),
                            d=float(stderr[3] * unit)),
                a_in_unit=float(a), d_in_unit=float(d), rms_log_residual=rms)


def pareto_frontier(compute: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the runs no other run beats with less or equal compute, by compute."""
    order = np.lexsort((error, compute))
    frontier, best = [], np.inf
    for i in order:
        if error[i] < best:
            frontier.append(i)
            best = error[i]
    return np.asarray(frontier, int)


# results.csv ---------------------------------------------------------------------------------------------------------
def read_metrics(workdir: str) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def collect(sweep_dir: str, runs: dict[str, dict[str, Any]], count_flops: bool = True,
            cwd: str | None = None) -> pandas.DataFrame:
    """One row per run: every swept field, final and best eval top-1, train loss, few-shot accuracy where logged,
    FLOPs, wall time and parameters."""
    import pandas as pd
    rows = []
    for dirname, overrides in runs.items():
        workdir = os.path.join(sweep_dir, dirname)
        row: dict[str, Any] = dict(run=dirname.rsplit('.', 1)[-1], name=dirname.rsplit('.', 1)[0],
                                   status=status(workdir), **overrides)
        metrics = read_metrics(workdir)
        evals = [m for m in metrics if 'eval_top1' in m]
        losses = [m for m in metrics if 'train_loss' in m]
        if evals:
            row.update(final_eval_top1=evals[-1]['eval_top1'], best_eval_top1=max(m['eval_top1'] for m in evals),
                       final_eval_loss=evals[-1].get('eval_loss'), final_step=evals[-1]['step'])
        if losses:
            row['final_train_loss'] = losses[-1]['train_loss']
        for key in sorted({k for m in metrics for k in m if 'shot' in k}):  # few-shot linear probes, where logged
            row[key] = [m[key] for m in metrics if key in m][-1]
        done = read_json(os.path.join(workdir, 'DONE'))
        if done:
            row['final_eval_top1'] = done.get('eval_top1', row.get('final_eval_top1'))
        config = read_json(os.path.join(workdir, 'config.json')) or {}
        for field in ('model_name', 'train_split', 'total_steps', 'num_epochs', 'batch_size', 'seed'):
            if field in config:
                row.setdefault(field, config[field])
        flops = read_json(os.path.join(workdir, 'flops.json'))
        if flops is None and count_flops and row['status'] == DONE:
            try:
                flops = write_flops(workdir, cwd)
            except Exception as e:  # noqa: BLE001 (a report without one run's FLOPs beats no report)
                print(f'No FLOP count for {dirname}: {type(e).__name__}: {e}')
        if flops:
            row.update({k: flops.get(k) for k in ('model', 'family', 'params', 'train_examples', 'steps', 'images',
                                                   'xla_train_flops_per_image', 'train_flops',
                                                   'analytic_train_flops')})
        row['wall_s'] = wall_seconds(workdir)
        rows.append(row)
    return pd.DataFrame(rows)


# Plots ---------------------------------------------------------------------------------------------------------------
def _model_key(df) -> pandas.Series:
    return df['model'] if 'model' in df and df['model'].notna().any() else df.get('model_name', df['name'])


def plot_data_scaling(df, path: str) -> None:
    """ViT paper Fig. 3/4: top-1 vs the number of training images, one line per model, a panel per step budget.
    Repeats (seeds) are averaged, their spread drawn as error bars."""
    import matplotlib.pyplot as plt
    df = _finished(df, 'steps', 'train_examples', 'params')
    budgets = sorted(df['steps'].dropna().unique()) if len(df) and 'steps' in df else []
    fig, axes = plt.subplots(1, max(len(budgets), 1), figsize=(5.5 * max(len(budgets), 1), 4.2), squeeze=False,
                             sharey=True)
    if not budgets:
        axes[0, 0].text(0.5, 0.5, 'no finished runs', ha='center', va='center', transform=axes[0, 0].transAxes)
    for ax, steps in zip(axes[0], budgets):
        part = df[df['steps'] == steps]
        for model, runs in sorted(part.groupby(_model_key(part)), key=lambda kv: kv[1]['params'].max()):
            stats = runs.groupby('train_examples')['final_eval_top1'].agg(['mean', 'std', 'count']).reset_index()
            ax.errorbar(stats['train_examples'], 100 * stats['mean'], yerr=100 * stats['std'].fillna(0),
                        marker='o', capsize=3, label=f'{model} ({runs["params"].iloc[0] / 1e3:.0f}k)')
        ax.set_xscale('log')
        ax.set_xlabel('training images')
        ax.set_title(f'{int(steps)} steps')
        ax.grid(alpha=0.3, which='both')
    axes[0, 0].set_ylabel('eval top-1 (%)')
    if axes[0, -1].get_legend_handles_labels()[0]:
        axes[0, -1].legend(fontsize=8, loc='lower right')
    fig.suptitle('Top-1 vs training-set size (ViT paper Fig. 3/4)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compute_scaling(df, path: str) -> dict[str, Any]:
    """Error vs training compute, log-log, per family: all runs, the Pareto frontier, a power law fitted to the
    frontier (its parameters and standard errors in the legend). Returns the fits, by family."""
    import matplotlib.pyplot as plt
    fits: dict[str, Any] = {}
    ok = _finished(df, 'train_flops', 'family')
    families = sorted(ok['family'].dropna().unique()) if len(ok) else []
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(6 * max(len(families), 1), 4.6), squeeze=False)
    if not families:
        axes[0, 0].text(0.5, 0.5, 'no finished runs with a FLOP count', ha='center', va='center',
                        transform=axes[0, 0].transAxes)
    for ax, family in zip(axes[0], families):
        part = ok[ok['family'] == family]
        compute = part['train_flops'].to_numpy(float)
        error = 1.0 - part['final_eval_top1'].to_numpy(float)
        for model, runs in sorted(part.groupby(_model_key(part)), key=lambda kv: kv[1]['params'].max()):
            ax.scatter(runs['train_flops'], 1.0 - runs['final_eval_top1'], s=18, alpha=0.7, label=model)
        frontier = pareto_frontier(compute, error)
        ax.step(compute[frontier], error[frontier], where='post', color='k', lw=1, alpha=0.6, label='Pareto frontier')
        fit = fit_power_law(compute[frontier], error[frontier])
        fit['frontier_runs'] = part['run'].iloc[frontier].tolist()
        fits[family] = fit
        if fit['fit']:
            grid = np.geomspace(compute.min() / 1.5, compute.max() * 3, 200)
            s = fit['stderr']
            caveat = '' if fit['constrained'] else f'\n(not constrained by {fit["points"]} points: stderr > value)'
            ax.plot(grid, power_law(grid, fit['a'], fit['b'], fit['c'], fit['d']), 'r--',
                    label=(f'fit to the frontier: a(C+d)^-b + c\nb={fit["b"]:.2f}±{s["b"]:.2f}, '
                           f'c={fit["c"]:.3f}±{s["c"]:.3f}\na={fit["a"]:.3g}±{s["a"]:.2g}, '
                           f'd={fit["d"]:.2g}±{s["d"]:.2g}{caveat}'))
        else:
            ax.text(0.03, 0.04, f'no fit: {fit["reason"]}', transform=ax.transAxes, fontsize=8, color='r')
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('training compute (FLOPs, XLA count)')
        ax.set_ylabel('eval error (1 - top-1)')
        ax.set_title(family)
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=7)
    fig.suptitle('Error vs compute (ViT paper Fig. 5), saturating power law (Zhai et al. 2022)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fits


def _finished(df, *columns: str):
    """The runs with a final top-1 and every one of ``columns``."""
    columns = ('final_eval_top1',) + columns
    if not len(df) or any(c not in df for c in columns):
        return df.iloc[:0]
    return df[df[list(columns)].notna().all(axis=1)]


def plot_loss_curves(sweep_dir: str, df, path: str) -> None:
    """Train loss and eval top-1 of every run against its steps, a colour per model."""
    import matplotlib.pyplot as plt
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    models = list(dict.fromkeys(_model_key(df).fillna('?'))) if len(df) else []
    labelled = set()
    for (_, row), model in zip(df.iterrows(), _model_key(df).fillna('?') if len(df) else []):
        metrics = read_metrics(os.path.join(sweep_dir, f'{row["name"]}.{row["run"]}'))
        train = [(m['step'], m['train_loss']) for m in metrics if 'train_loss' in m]
        evals = [(m['step'], m['eval_top1']) for m in metrics if 'eval_top1' in m]
        colour = plt.cm.tab10(models.index(model) % 10)
        label = None if model in labelled else model
        labelled.add(model)
        if train:
            loss_ax.plot(*zip(*train), color=colour, alpha=0.6, lw=1, label=label)
        if evals:
            top1_ax.plot(*zip(*evals), color=colour, alpha=0.6, lw=1, marker='.')
    loss_ax.set(xlabel='step', ylabel='train loss', title='train loss, every run')
    top1_ax.set(xlabel='step', ylabel='eval top-1', title='eval top-1, every run')
    for ax in (loss_ax, top1_ax):
        ax.grid(alpha=0.3)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep_dir: str, runs: dict[str, dict[str, Any]], count_flops: bool = True,
                 cwd: str | None = None) -> dict[str, str]:
    """``results.csv``, ``fits.json`` and the three plots in ``sweep_dir``; returns their paths."""
    import matplotlib
    matplotlib.use('Agg')
    df = collect(sweep_dir, runs, count_flops, cwd)
    paths = {name: os.path.join(sweep_dir, name) for name in
             ('results.csv', 'fits.json', 'data_scaling.png', 'compute_scaling.png', 'loss_curves.png')}
    df.to_csv(paths['results.csv'], index=False)
    plot_data_scaling(df, paths['data_scaling.png'])
    fits = plot_compute_scaling(df, paths['compute_scaling.png'])
    write_json(paths['fits.json'], fits)
    plot_loss_curves(sweep_dir, df, paths['loss_curves.png'])
    return paths
