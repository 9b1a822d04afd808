"""Every encoder block's attention maps, read from the ``'attention_weights'`` collection the blocks sow.

Making that collection mutable switches the blocks to their explicit-softmax path: the CPU kernel and
``jax.nn.dot_product_attention`` never form the maps (timm's fused attention left vit-explain with no maps at all,
its issue #23). T2T's token layers sow theirs too; only the backbone's
encoder is read here.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import numpy as np

from vit_jax.models.vit import VisionTransformer


class NotApplicableError(ValueError):
    """The model lacks the part an analysis looks at (e.g. a ResNet has no attention)."""


def require_transformer(model) -> VisionTransformer:
    """``model`` if it has attention, position embeddings and tokens; else a NotApplicableError saying so."""
    if not isinstance(model, VisionTransformer):
        raise NotApplicableError(f'{type(model).__name__} is a CNN: it has no attention, position embeddings or '
                                 'patch embedding to analyse. Choose a ViT, DeiT, T2T-ViT or hybrid model.')
    return model


def pixels_per_token(model: VisionTransformer) -> float:
    """The side, in input pixels, of the image square that one patch token covers (ResNet stride x patch at hybrids)."""
    return model.image_size / model.grid_size


def encoder_attention(model: VisionTransformer, params, images: np.ndarray, with_outputs: bool = False):
    """Images (B, S, S, 3) -> every encoder block's attention (L, B, H, N, N), float32, N = prefix + patches.

    ``with_outputs``: also the model's eval outputs (the logits) of the same forward pass.
    """
    outputs, state = _apply_with_attention(model, params, images)
    encoder = state['attention_weights']['encoder']
    if 'blocks' in encoder:  # scan_layers: one entry with a leading layer axis
        maps = np.asarray(encoder['blocks']['attn']['weights'][0])
    else:
        maps = np.stack([np.asarray(encoder[f'block_{i}']['attn']['weights'][0]) for i in range(model.num_layers)])
    return (maps, np.asarray(outputs)) if with_outputs else maps


def batch_size_for(model: VisionTransformer, budget_bytes: int = 512 * 2 ** 20) -> int:
    """Images per forward pass whose attention maps (L x B x H x N^2 float32) fit in ``budget_bytes``."""
    n = model.grid_size ** 2 + model.num_prefix_tokens
    return max(1, budget_bytes // (4 * model.num_layers * model.num_heads * n * n))


def batched_attention(model: VisionTransformer, params, images: np.ndarray,
                      batch_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(attention (L, b, H, N, N), outputs) of each batch of ``images`` in turn; the maps of ViT-L at 384 px take
    ~0.5 GB an image, so callers reduce each batch before the next. The last batch is padded to the same shape (one
    compilation) and its padding dropped."""
    batch_size = batch_size or batch_size_for(model)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        real = len(batch)
        if real < batch_size and start:
            batch = np.concatenate([batch, np.zeros((batch_size - real,) + batch.shape[1:], batch.dtype)])
        maps, outputs = encoder_attention(model, params, batch, with_outputs=True)
        yield maps[:, :real], outputs[:real]


@functools.partial(jax.jit, static_argnums=0)
def _apply_with_attention(model: VisionTransformer, params, images):
    return model.apply({'params': params}, images, mutable=['attention_weights'])
