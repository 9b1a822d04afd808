"""Self-supervised objectives on masked patches: the ViT paper's masked patch prediction and MAE.

Masked patch prediction (ViT, appendix B.1.2; its code was never released): corrupt 50% of each image's patch
embeddings (80% replaced by a learnable [mask] embedding, 10% by another patch of the same image, 10% kept), encode,
and predict from each corrupted patch's output token its mean colour, 3 bits per channel (512 classes).

MAE (He et al. 2022, facebookresearch/mae ``models_mae.py``): keep a random 25% of the patches, encode only those
(with their own positions), put mask tokens back in place, decode with a small Transformer and regress the pixels
of the removed patches, normalised per patch.

Both reach into the model through its stages (``embed`` -> ``encode(tokens, positions=...)``); the encoder is the
model's own. Their heads and MAE's decoder are the objective's parameters: trained and saved with the model, dropped
when the encoder is fine-tuned (``init_from`` reads the model's parameters only) or exported.
"""

from __future__ import annotations

import dataclasses
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.models.encoder import PORTABLE, Encoder, dense_kernel_init
from vit_jax.objectives.distillation import to_pixels
from vit_jax.objectives.supervised import Objective

MPP_TARGETS = ('mean_colour', 'downsampled', 'pixels')
EVAL_KEY = 1234  # masks of the eval batches: the same every eval, so eval losses compare across steps


def _partitioned(init, names):
    return nn.with_logical_partitioning(init, names)


# Masked patch prediction -----------------------------------------------------------------------------------------
def colour_class(pixels: jax.Array, bits: int = 3) -> jax.Array:
    """Mean colours in [0, 1], (..., 3) -> classes: bin = min(floor(v * 2^bits), 2^bits - 1), r * 64 + g * 8 + b."""
    levels = 2 ** bits
    bins = jnp.minimum(jnp.floor(pixels * levels), levels - 1).astype(jnp.int32)
    return (bins[..., 0] * levels + bins[..., 1]) * levels + bins[..., 2]


def patches(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, p, p, C), patches in the grid's row-major order (the model's token order)."""
    return einops.rearrange(images, 'b (h p1) (w p2) c -> b (h w) p1 p2 c', p1=patch_size, p2=patch_size)


def mpp_targets(images01: jax.Array, patch_size: int, target: str, bits: int = 3, downsample: int = 4) -> jax.Array:
    """Per-patch targets from images in [0, 1]: (B, N) classes, (B, N, 16) classes, or (B, N, p*p*3) pixels."""
    x = patches(images01, patch_size)
    if target == 'mean_colour':
        return colour_class(x.mean(axis=(2, 3)), bits)
    if target == 'downsampled':  # the 4x4-downsized patch: 16 mean colours, each 512-way
        s = patch_size // downsample
        cells = einops.reduce(x, 'b n (i s1) (j s2) c -> b n (i j) c', 'mean', s1=s, s2=s)
        return colour_class(cells, bits)
    return einops.rearrange(x, 'b n p1 p2 c -> b n (p1 p2 c)')


def corrupt(tokens: jax.Array, mask_token: jax.Array, rng: jax.Array, rate: float = 0.5, mask_prob: float = 0.8,
            random_prob: float = 0.1) -> tuple[jax.Array, jax.Array, dict]:
    """BERT-style corruption of an exact ``round(rate * N)`` patch embeddings per image (static shapes under jit).

    Of the corrupted ones, ``mask_prob`` become the [mask] embedding, ``random_prob`` another patch of the same image,
    the rest stay. Returns the corrupted tokens, the (B, N) corrupted mask, and the draws (for tests).
    """
    b, n, _ = tokens.shape
    k = int(round(rate * n))
    choose, kind_key, other_key = jax.random.split(rng, 3)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(choose, (b, n)), axis=1), axis=1)
    corrupted = ranks < k
    u = jax.random.uniform(kind_key, (b, n))
    masked = corrupted & (u < mask_prob)
    replaced = corrupted & (u >= mask_prob) & (u < mask_prob + random_prob)
    other = (jnp.arange(n)[None] + jax.random.randint(other_key, (b, n), 1, n)) % n  # never the patch itself
    random_tokens = jnp.take_along_axis(tokens, other[..., None], axis=1)
    out = jnp.where(masked[..., None], mask_token.astype(tokens.dtype), tokens)
    out = jnp.where(replaced[..., None], random_tokens, out)
    return out, corrupted, {'masked': masked, 'replaced': replaced, 'other': other}


class MPPHead(nn.Module):
    """The [mask] embedding and the linear prediction head on encoded patch tokens."""

    hidden_size: int
    outputs: int

    def setup(self):
        self.mask_token = self.param('mask_token', _partitioned(nn.initializers.normal(0.02), ('embed',)),
                                     (self.hidden_size,))
        self.head = nn.Dense(self.outputs, kernel_init=_partitioned(dense_kernel_init, ('embed', 'classes')),
                             bias_init=_partitioned(nn.initializers.zeros, ('classes',)), name='head')

    def __call__(self, tokens):
        return self.head(tokens), self.mask_token


@dataclasses.dataclass(frozen=True)
class MaskedPatchPrediction(Objective):
    target: str = 'mean_colour'
    corruption_rate: float = 0.5
    mask_prob: float = 0.8
    random_prob: float = 0.1
    bits: int = 3
    normalization: str = 'inception'
    self_supervised = True

    @property
    def outputs(self) -> int:
        p, levels = self.model.patch_size, 2 ** (3 * self.bits)
        return {'mean_colour': levels, 'downsampled': 16 * levels, 'pixels': p * p * 3}[self.target]

    def _head(self) -> MPPHead:
        return MPPHead(self.model.hidden_size, self.outputs)

    def init(self, rng, image_size):
        return self._head().init(rng, jnp.zeros((1, 1, self.model.hidden_size)))['params']

    def _loss(self, params, objective_params, batch, rng, train):
        images = batch['images']
        noise, corrupt_key = jax.random.split(rng)
        head = self._head()

        def forward(m, x, train):
            tokens = m.embed(x, train)
            tokens, corrupted, _ = corrupt(tokens, objective_params['mask_token'], corrupt_key, self.corruption_rate, self.mask_prob,
                                           self.random_prob)
            encoded = m.encode(tokens, train)[:, m.num_prefix_tokens:]
            return encoded, corrupted

        encoded, corrupted = self.model.apply({'params': params}, images, train, rngs={'dropout': noise},
                                              method=forward)
        logits = head.apply({'params': objective_params}, encoded)[0].astype(jnp.float32)
        pixels = to_pixels(images.astype(jnp.float32), self.normalization) / 255.0
        targets = mpp_targets(jnp.clip(pixels, 0.0, 1.0), self.model.patch_size, self.target, self.bits)
        if self.target == 'pixels':
            per_patch = jnp.mean((logits - targets) ** 2, axis=-1)
        elif self.target == 'downsampled':
            logits = logits.reshape(*logits.shape[:2], 16, -1)
            per_patch = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)
        else:
            per_patch = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        weights = corrupted.astype(jnp.float32)  # only the corrupted patches count
        loss = jnp.sum(per_patch * weights) / jnp.sum(weights)
        return loss, per_patch, weights

    def loss(self, params, objective_params, frozen, batch, rng):
        loss, _, _ = self._loss(params, objective_params, batch, rng, True)
        return loss, {'train_loss': loss}

    def eval_sums(self, params, objective_params, frozen, batch):
        _, per_patch, weights = self._loss(params, objective_params, batch, jax.random.key(EVAL_KEY), False)
        mask = batch['mask']
        per_image = jnp.sum(per_patch * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)
        return {'loss': jnp.sum(per_image * mask), 'count': jnp.sum(mask)}


# MAE -------------------------------------------------------------------------------------------------------------
def random_masking(rng: jax.Array, batch: int, length: int, mask_ratio: float):
    """models_mae.py ``random_masking``: per-image argsort of uniform noise; keep ``int(L * (1 - ratio))``.

    Returns ids_keep (B, keep), the binary mask (B, L; 0 kept, 1 removed) and ids_restore (B, L).
    """
    keep = int(length * (1 - mask_ratio))
    noise = jax.random.uniform(rng, (batch, length))
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascend: small is keep, large is remove
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = jnp.concatenate([jnp.zeros((batch, keep)), jnp.ones((batch, length - keep))], axis=1)
    return ids_keep, jnp.take_along_axis(mask, ids_restore, axis=1), ids_restore


def mae_sincos2d(grid: int, dim: int) -> np.ndarray:
    """models_mae.py / util/pos_embed.py ``get_2d_sincos_pos_embed`` (without the class token's zero row), (L, dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.mgrid[:grid, :grid]
    w = np.einsum('m,d->md', cols.reshape(-1), omega)  # their grid[0] is the column (np.meshgrid(w, h))
    h = np.einsum('m,d->md', rows.reshape(-1), omega)
    return np.concatenate([np.sin(w), np.cos(w), np.sin(h), np.cos(h)], axis=1).astype(np.float32)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """models_mae.py ``patchify``: (B, H, W, 3) -> (B, L, p*p*3), each patch row, column, channel."""
    return einops.rearrange(images, 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', p1=patch_size, p2=patch_size)


def mae_targets(images: jax.Array, patch_size: int, norm_pix_loss: bool) -> jax.Array:
    target = patchify(images, patch_size)
    if norm_pix_loss:  # models_mae.py forward_loss: torch's .var() is unbiased
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


class MAEDecoder(nn.Module):
    """models_mae.py's decoder: embed, mask tokens put back in place, fixed positions, Transformer blocks, pixels."""

    width: int
    depth: int
    heads: int
    grid: int
    patch_dim: int
    num_prefix_tokens: int
    platform: str = PORTABLE  # the encoder's: the decoder's attention runs where the encoder's does

    @nn.compact
    def __call__(self, x: jax.Array, ids_restore: jax.Array) -> jax.Array:
        b, length = ids_restore.shape
        x = nn.Dense(self.width, name='decoder_embed', kernel_init=_partitioned(dense_kernel_init, ('embed', 'mlp')),
                     bias_init=_partitioned(nn.initializers.zeros, ('mlp',)))(x)
        mask_token = self.param('mask_token', _partitioned(nn.initializers.normal(0.02), (None, None, 'mlp')),
                                (1, 1, self.width))
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        filler = jnp.broadcast_to(mask_token, (b, length - visible.shape[1], self.width)).astype(x.dtype)
        tokens = jnp.concatenate([visible, filler], axis=1)
        tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)  # unshuffle
        tokens = tokens + jnp.asarray(mae_sincos2d(self.grid, self.width))[None]
        # The class token's fixed position is zeros (models_mae.py decoder_pos_embed[:, 0]).
        x = jnp.concatenate([prefix, tokens], axis=1)
        x = Encoder(self.depth, self.heads, 4 * self.width, gelu_approximate=False, platform=self.platform,
                    name='decoder')(x, True)
        x = nn.Dense(self.patch_dim, name='decoder_pred', kernel_init=_partitioned(dense_kernel_init, ('mlp', None)),
                     bias_init=_partitioned(nn.initializers.zeros, (None,)))(x)
        return x[:, self.num_prefix_tokens:]


@dataclasses.dataclass(frozen=True)
class MAE(Objective):
    mask_ratio: float = 0.75
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    self_supervised = True

    def _decoder(self) -> MAEDecoder:
        p = self.model.patch_size
        return MAEDecoder(self.decoder_width, self.decoder_depth, self.decoder_heads, self.model.grid_size,
                          p * p * 3, self.model.num_prefix_tokens, self.model.platform)

    def init(self, rng, image_size):
        n = self.model.grid_size ** 2
        x = jnp.zeros((1, self.model.num_prefix_tokens + n, self.model.hidden_size))
        return self._decoder().init(rng, x, jnp.arange(n)[None])['params']

    def encode_visible(self, params, images, rng, train: bool, dropout_rng=None):
        """The model's encoder on the kept patches only, each with its own position: (B, prefix + keep, D)."""

        def forward(m, x, train):
            tokens = m.embed(x, train)
            b, n, d = tokens.shape
            ids_keep, mask, ids_restore = random_masking(rng, b, n, self.mask_ratio)
            kept = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
            positions = jnp.take_along_axis(jnp.broadcast_to(m.patch_positions(), (b, n, d)), ids_keep[..., None],
                                            axis=1)
            return m.encode(kept, train, positions=positions), mask, ids_restore

        rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
        return self.model.apply({'params': params}, images, train, rngs=rngs, method=forward)

    def _loss(self, params, objective_params, images, rng, train):
        mask_key, dropout = jax.random.split(rng)
        latent, mask, ids_restore = self.encode_visible(params, images, mask_key, train, dropout)
        pred = self._decoder().apply({'params': objective_params}, latent, ids_restore).astype(jnp.float32)
        target = mae_targets(images.astype(jnp.float32), self.model.patch_size, self.norm_pix_loss)
        per_patch = jnp.mean((pred - target) ** 2, axis=-1)
        return per_patch, mask

    def loss(self, params, objective_params, frozen, batch, rng):
        per_patch, mask = self._loss(params, objective_params, batch['images'], rng, True)
        loss = jnp.sum(per_patch * mask) / jnp.sum(mask)  # mean loss on removed patches
        return loss, {'train_loss': loss}

    def eval_sums(self, params, objective_params, frozen, batch):
        per_patch, mask = self._loss(params, objective_params, batch['images'], jax.random.key(EVAL_KEY), False)
        per_image = jnp.sum(per_patch * mask, -1) / jnp.sum(mask, -1)
        return {'loss': jnp.sum(per_image * batch['mask']), 'count': jnp.sum(batch['mask'])}


def check_patch_model(model, objective: str) -> None:
    if getattr(model, 'stem', None) != 'patch':
        raise ValueError(f'config.objective={objective!r} masks image patches: it needs a ViT with a patch stem '
                         f'(stem="patch"), not {getattr(model, "stem", type(model).__name__)!r}.')


def create_masked(config, model, objective: str) -> Objective:
    check_patch_model(model, objective)
    if objective == 'masked_patch_prediction':
        m = config.mpp
        if m.target not in MPP_TARGETS:
            raise ValueError(f'config.mpp.target={m.target!r} is not one of {MPP_TARGETS}.')
        for field in ('corruption_rate', 'mask_prob', 'random_prob'):
            if not 0.0 <= m[field] <= 1.0:
                raise ValueError(f'config.mpp.{field}={m[field]} must be in [0, 1].')
        if m.mask_prob + m.random_prob > 1.0:
            raise ValueError(f'config.mpp.mask_prob + random_prob = {m.mask_prob + m.random_prob} exceeds 1.')
        if m.target == 'downsampled' and model.patch_size % 4:
            raise ValueError(f'config.mpp.target="downsampled" needs a patch size divisible by 4, not '
                             f'{model.patch_size}.')
        return MaskedPatchPrediction(model, target=m.target, corruption_rate=m.corruption_rate,
                                     mask_prob=m.mask_prob, random_prob=m.random_prob, bits=m.bits,
                                     normalization=config.augment.normalization)
    m = config.mae
    if not 0.0 < m.mask_ratio < 1.0:
        raise ValueError(f'config.mae.mask_ratio={m.mask_ratio} must be in (0, 1).')
    if m.decoder_width % m.decoder_heads or m.decoder_width % 4:
        raise ValueError(f'config.mae.decoder_width={m.decoder_width} must be a multiple of decoder_heads='
                         f'{m.decoder_heads} and of 4.')
    return MAE(model, mask_ratio=m.mask_ratio, decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
               decoder_heads=m.decoder_heads, norm_pix_loss=m.norm_pix_loss)


__all__ = ['MAE', 'MaskedPatchPrediction', 'colour_class', 'corrupt', 'create_masked', 'mae_targets',
           'mpp_targets', 'random_masking']
