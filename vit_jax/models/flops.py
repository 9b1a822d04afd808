"""Analytic FLOPs of the models, in the ViT paper's convention (Table 6, "exaFLOPs" of pretraining).

    flops(model, image_size)                            # forward FLOPs of one image
    train_flops(model, image_size, images)              # a pretraining run: forward + backward over ``images``

The convention, chosen so that Table 6 comes out (ViT-B/32 55, B/16 224, L/16 783, H/14 4262 and BiT ResNet50x1
50 exaFLOPs for 7 or 14 epochs of JFT-300M's 303M images; ``tests/test_flops.py`` checks all five within 3%):

- a multiply-add is 2 FLOPs; only matmuls and convolutions count (norms, softmax, GELU, pooling and the optimizer
  are < 1% of a ViT and left out, as the paper's counts and the usual "GFLOPs" tables do);
- attention counts its projections and both of its matmuls, q k^T and attn v (2 N^2 D multiply-adds per layer);
- training is 3x the forward pass (the backward pass computes a gradient for the inputs and one for the weights,
  each as costly as the forward), over epochs x examples images;
- the head has JFT's 18,291 classes in Table 6 (``num_classes``; 0.1-0.4% of a ViT).

With it the ViT rows land within 0.2% (B/32 at +2.3%). Table 6's ResNet rows fit a ResNet with the stride on the first
1x1 conv of a stage (ResNet v1: 50x1 -0.9%, 101x1 +0.8%, 152x1 +2.1%), not on the 3x3 conv as in BiT and in our
``ResNet`` (+5.0%, +3.9%, +4.2%): ``flops`` counts the model as built, ``resnet_stride_on='1x1'`` the paper's way.

XLA's cost analysis of the real train step (``python -m vit_jax.bench``, ``train_flops_per_image``) counts
everything, the elementwise work included, and lands a few percent above this count for a ViT.
"""

from __future__ import annotations

import flax.linen as nn

from vit_jax.models.resnet import ResNet

JFT_IMAGES = 303_000_000  # ViT paper section 4.1: "JFT-18k with 18k classes and 303M high-resolution images"
JFT_CLASSES = 18_291


def _conv_macs(size: int, kernel: int, stride: int, cin: int, cout: int) -> tuple[int, int]:
    """Multiply-adds of a 'SAME' k x k conv on a size x size map, and the output size."""
    out = -(-size // stride)
    return out * out * kernel * kernel * cin * cout, out


def resnet_macs(layers: tuple[int, ...], width: float, image_size: int, stride_on: str = '3x3',
                ) -> tuple[int, int, int]:
    """BiT ResNet: multiply-adds, the feature map's size and channels. Stages stride on their first unit's 3x3 conv
    (BiT, ours) or on its first 1x1 conv (``stride_on='1x1'``, ResNet v1, what Table 6 counted)."""
    if stride_on not in ('3x3', '1x1'):
        raise ValueError(f"stride_on={stride_on!r} is not '3x3' (BiT, our ResNet) or '1x1' (ResNet v1).")
    w = int(64 * width)
    macs, size = _conv_macs(image_size, 7, 2, 3, w)  # root conv 7x7/2
    size = -(-size // 2)  # max-pool 3x3/2
    cin = w
    for stage, units in enumerate(layers):
        f = w * 2 ** stage
        for unit in range(units):
            stride = 2 if stage > 0 and unit == 0 else 1
            first = stride if stride_on == '1x1' else 1
            m1, mid = _conv_macs(size, 1, first, cin, f)
            m2, out = _conv_macs(mid, 3, stride // first, f, f)
            m3, _ = _conv_macs(out, 1, 1, f, 4 * f)
            proj = _conv_macs(size, 1, stride, cin, 4 * f)[0] if cin != 4 * f or stride != 1 else 0
            macs += m1 + m2 + m3 + proj
            size, cin = out, 4 * f
    return macs, size, cin


def encoder_macs(tokens: int, hidden: int, mlp: int, layers: int) -> int:
    """Multiply-adds of the encoder (ViT eq. 2-3): per layer qkv + output (4 N D^2), MLP (2 N D M), q k^T and
    attn v (2 N^2 D)."""
    return layers * (tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 2 * tokens * tokens * hidden)


def flops(model: nn.Module | str, image_size: int | None = None, num_classes: int = 1000,
          resnet_stride_on: str = '3x3') -> float:
    """Forward FLOPs of one image (2 per multiply-add) of a ViT, hybrid, DeiT or BiT ResNet.

    ``model`` is a module or a registered name (then built with ``num_classes`` and ``image_size``); ``image_size``
    defaults to the module's own. ``resnet_stride_on='1x1'`` counts a ResNet (stem) as Table 6 did (see above).
    """
    from vit_jax.models.registry import create_model
    from vit_jax.models.vit import VisionTransformer
    if isinstance(model, str):
        model = create_model(model, num_classes=num_classes, **({'image_size': image_size} if image_size else {}))
    image_size = image_size or model.image_size
    if image_size != model.image_size:
        model = model.clone(image_size=image_size)
    if isinstance(model, ResNet):
        macs, _, channels = resnet_macs(tuple(model.resnet_layers), model.resnet_width, image_size,
                                        resnet_stride_on)
        return 2.0 * (macs + channels * model.num_classes)
    if not isinstance(model, VisionTransformer) or model.stem == 't2t':
        raise ValueError(f'No analytic FLOP count for {type(model).__name__} (stem {getattr(model, "stem", None)!r}): '
                         f'use XLA\'s count, `python -m vit_jax.bench --mode compile` (train_flops_per_image).')
    d, grid = model.hidden_size, model.grid_size
    macs, channels = 0, 3
    if model.stem == 'resnet':
        macs, _, channels = resnet_macs(tuple(model.resnet_layers), model.resnet_width, image_size, resnet_stride_on)
    macs += grid * grid * model.patch_size ** 2 * channels * d  # patch embedding (ViT eq. 1)
    macs += encoder_macs(grid * grid + model.num_prefix_tokens, d, model.mlp_dim, model.num_layers)
    features = d
    if model.representation_size:
        macs += d * model.representation_size
        features = model.representation_size
    macs += features * model.num_classes * (1 + int(model.distilled))
    return 2.0 * macs


def train_flops(model: nn.Module | str, image_size: int | None = None, images: float = 1.0,
                num_classes: int = 1000, resnet_stride_on: str = '3x3') -> float:
    """FLOPs of training on ``images`` images (epochs x dataset size): 3x the forward pass of each (see above)."""
    return 3.0 * flops(model, image_size, num_classes, resnet_stride_on) * images
