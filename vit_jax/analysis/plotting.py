"""The figures of ViT section 4.5 as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap

import numpy as np

from vit_jax.analysis.filters import to_rgb


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only: no display on a training machine
    import matplotlib.pyplot as plt
    return plt


def display_image(image: np.ndarray, normalization: str) -> np.ndarray:
    """An eval-preprocessed image (S, S, 3) back to [0, 1] RGB: what the model saw, for overlays."""
    from vit_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD  # constants only; preprocess imports tf
    if normalization == 'inception':
        x = (image + 1.0) / 2.0
    else:
        x = image * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.clip(x, 0.0, 1.0)


def mosaic(tiles: np.ndarray, columns: int, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """(n, h, w[, c]) tiles -> one image of ``columns`` tiles a row, ``gap`` pixels of ``fill`` between them."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap) + tiles.shape[3:], fill, np.float64)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def plot_token_maps(images: np.ndarray, maps: np.ndarray, titles: list[str], path: str, suptitle: str) -> None:
    """A column per image: the image above itself overlaid with its map (grid x grid), resized bilinearly to it."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(max(1.5 * n, 3.2), 3.6), squeeze=False)
    for i, (image, m, title) in enumerate(zip(images, maps, titles)):
        extent = (0, image.shape[1], image.shape[0], 0)
        axes[0, i].imshow(image, extent=extent, interpolation='nearest')
        axes[0, i].set_title(title, fontsize=7)
        axes[1, i].imshow(image, extent=extent, interpolation='nearest')
        axes[1, i].imshow(m / max(m.max(), 1e-12), extent=extent, cmap='jet', alpha=0.5, vmin=0, vmax=1,
                          interpolation='bilinear')
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(textwrap.fill(suptitle, width=int(14 * fig.get_figwidth())), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attention_distance(distance: np.ndarray, image_size: int, path: str, title: str) -> None:
    """Mean attention distance (L, H) in pixels: one dot per head at each depth (ViT figure 7, right)."""
    plt = _pyplot()
    layers, heads = distance.shape
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), distance[:, h], s=12, label=f'head {h + 1}')
    ax.set_xlabel('network depth (layer)')
    ax.set_ylabel('mean attention distance (pixels)')
    ax.set_ylim(0, image_size)
    ax.set_xticks(np.arange(1, layers + 1))
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc='lower right')
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_position_similarity(similarity: np.ndarray, path: str, title: str) -> None:
    """(g, g, g, g) cosine similarities: tile [r, c] is patch (r, c) against every patch (ViT figure 7, centre)."""
    plt = _pyplot()
    g = similarity.shape[0]
    image = mosaic(similarity.reshape(g * g, g, g), columns=g)
    side = max(3.4, 2 * image.shape[0] / 100)  # >= 2 screen pixels per similarity: no rows lost to resampling
    fig, ax = plt.subplots(figsize=(side + 1.4, side + 0.8))
    shown = ax.imshow(np.ma.masked_invalid(image), cmap='viridis', vmin=-1, vmax=1, interpolation='nearest')
    ax.set_xticks([(g + 1) * c + g / 2 - 0.5 for c in range(g)], [str(c + 1) for c in range(g)], fontsize=6)
    ax.set_yticks([(g + 1) * r + g / 2 - 0.5 for r in range(g)], [str(r + 1) for r in range(g)], fontsize=6)
    ax.set_xlabel('input patch column')
    ax.set_ylabel('input patch row')
    fig.colorbar(shown, ax=ax, label='cosine similarity', fraction=0.046)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_filters(components: np.ndarray, explained: np.ndarray, path: str, title: str) -> None:
    """The principal components (n, p, p, C) of the embedding filters as RGB tiles (ViT figure 7, left)."""
    plt = _pyplot()
    n = len(components)
    columns = min(7, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.25 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis('off')
            continue
        ax.imshow(to_rgb(components[i]), interpolation='nearest')
        ax.set_title(f'{100 * explained[i]:.1f}%', fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
