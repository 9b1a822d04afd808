"""Linear few-shot evaluation of frozen representations (ViT paper section 4; big_vision evaluators/fewshot_lsr.py).

For each seed, ``shots`` training images per class are drawn; their pre-logits features are whitened with those
images' mean and std, a constant bias column (100, almost unregularised) is appended, and the regularised least
squares onto {-1, 1}^K targets is solved in closed form; accuracy is the argmax on the eval split. As big_vision:
l2 = 2^10, features of the model's ``pre_logits`` (the pooled tokens before the head), eval preprocessing for both
splits, seeds 0, 1, 2 (``np.random.default_rng(seed)`` permutes each class's indices), results averaged over seeds.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding

BIAS_CONSTANT = 100.0  # fewshot_lsr.py: "large so it's almost unregularized"


def lsr_weights(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """fewshot_lsr.py ``_precompute_cache`` + the solve: returns (W, mean, std).

    N >= D: W = (X^T X + l2 I)^-1 X^T Y;  D > N: W = X^T (X X^T + l2 I)^-1 Y, both through one eigendecomposition.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
    if x.shape[0] >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ targets), q
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ targets, x.T @ q
    return (lhs / (eigs + l2_reg)[None]) @ rhs, mean, std


def lsr_accuracy(weights: tuple[np.ndarray, np.ndarray, np.ndarray], x_test: np.ndarray, y_test: np.ndarray) -> float:
    w, mean, std = weights
    x = np.pad((np.asarray(x_test, np.float64) - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    return float(np.mean(np.argmax(x @ w, axis=1) == np.asarray(y_test)))


def fewshot_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                       num_classes: int, shots: Iterable[int], l2_reg: float = 2.0 ** 10,
                       seeds: int = 3) -> dict[int, list[float]]:
    """{shots: [accuracy of each seed]}: fewshot_lsr.py ``compute_fewshot_metrics``."""
    results = {s: [] for s in shots}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        class_indices = [rng.permutation(np.where(train_y == c)[0]) for c in range(num_classes)]
        for s in shots:
            idx = np.concatenate([indices[:s] for indices in class_indices])
            weights = lsr_weights(train_x[idx], train_y[idx], num_classes, l2_reg)
            results[s].append(lsr_accuracy(weights, test_x, test_y))
    return results


def representation_fn(model, mesh, param_shardings: Any):
    """The jitted pre-logits features of a batch, gathered on every host."""

    def features(params, batch):
        _, state = model.apply({'params': params}, batch['images'], train=False, mutable=['intermediates'])
        return state['intermediates']['pre_logits'][0].astype(jnp.float32), batch['labels'], batch['mask']

    # Replicated outputs: every host gets every example's features (the solve is small and runs on the host).
    return jax.jit(features, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def representations(features, params, config, split: str, mesh, device_batches) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of every real example of ``split`` (eval preprocessing)."""
    from vit_jax import data
    c = copy.deepcopy(config)
    c.unlock()
    c.eval_split = split
    xs, ys = [], []
    it = data.eval_iterator(c, process_index=jax.process_index(), process_count=jax.process_count())
    for batch in device_batches(it, mesh):
        x, labels, mask = jax.device_get(features(params, batch))
        xs.append(np.asarray(x)[np.asarray(mask) > 0])
        ys.append(np.asarray(labels)[np.asarray(mask) > 0])
    return np.concatenate(xs), np.concatenate(ys)


def evaluate(features, params, config, mesh, device_batches, num_classes: int) -> dict[str, float]:
    """``fewshot_{shots}shot``: the mean accuracy over seeds, for each of ``config.fewshot.shots``."""
    f = config.fewshot
    train_x, train_y = representations(features, params, config, f.train_split or config.train_split, mesh,
                                       device_batches)
    test_x, test_y = representations(features, params, config, config.eval_split, mesh, device_batches)
    results = fewshot_accuracies(train_x, train_y, test_x, test_y, num_classes, f.shots, f.l2_reg, f.seeds)
    return {f'fewshot_{s}shot': float(np.mean(v)) for s, v in results.items()}
