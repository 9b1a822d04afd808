"""PyTorch mirrors of the vit_jax Flax models, computing exactly what they compute (for deployment, not training).

    module = build(config)            # config: the Flax model's fields as a plain dict (``convert.model_config``)
    logits = module(images_nchw)      # (B, 3, S, S) float32, normalised as the training pipeline does

Images are NCHW, as the DeiT mobile tutorial and every PyTorch runtime feed them (the Flax models take NHWC).
Outputs are what ``model.apply(..., train=False)`` returns: logits (B, classes); distilled DeiT the mean of its two
heads; ``unpooled`` classifiers one row per token (B, N, classes); ``num_classes=0`` the pre-logits features.

Every module is TorchScript-able, imports no JAX, and computes its dense layers with ``nn.Linear`` (so that dynamic
int8 quantization reaches all of them). Parameter names follow timm's ``VisionTransformer`` (ViT, DeiT: ``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.i.attn.qkv``, ...), the official T2T-ViT (``tokens_to_token.attention1.
kqv``, ``.w``, ...) and, for the BiT ResNet, BiT's PyTorch port (``resnet.body.block1.unit1.conv1``). Patch
embeddings and ResNet convolutions stay ``nn.Conv2d`` (convolutions in the originals, fp32 after dynamic
quantization, as in the DeiT tutorial). Quirks of the originals are kept: SAME padding as XLA (low = total // 2),
weight standardisation in every forward, T2T's dim ** -0.5 scale and v-residual, the Performer's k, q, v split and
float32 random features.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# BiT ResNet (hybrid stem and standalone classifier) ------------------------------------------------------------------
def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding along one axis: total = max((ceil(n / s) - 1) * s + k - n, 0), low = total // 2."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StdConv2d(nn.Module):
    """Weight-standardised conv, no bias (Qiao et al. 2019): zero mean, unit std per output channel, eps 1e-5 on std."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Standardised in every forward, as the original; over (in, kh, kw) with the population std (jnp.std).
        w = self.weight - self.weight.mean(dim=[1, 2, 3], keepdim=True)
        w = w / (w.pow(2).mean(dim=[1, 2, 3], keepdim=True).sqrt() + 1e-5)
        top, bottom = same_padding(x.shape[2], self.kernel, self.stride)
        left, right = same_padding(x.shape[3], self.kernel, self.stride)
        if top + bottom + left + right > 0:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, w, None, self.stride)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class BottleneckUnit(nn.Module):
    """Post-activation bottleneck 1x1 -> 3x3 (strided) -> 1x1 (4x wider), projection shortcut when shapes change."""

    def __init__(self, in_channels: int, features: int, stride: int):
        super().__init__()
        self.conv1, self.gn1 = StdConv2d(in_channels, features, 1), group_norm(features)
        self.conv2, self.gn2 = StdConv2d(features, features, 3, stride), group_norm(features)
        self.conv3, self.gn3 = StdConv2d(features, features * 4, 1), group_norm(features * 4)
        if in_channels != features * 4 or stride != 1:
            self.conv_proj, self.gn_proj = StdConv2d(in_channels, features * 4, 1, stride), group_norm(features * 4)
        else:
            self.conv_proj, self.gn_proj = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStem(nn.Module):
    """Root (7x7/2 StdConv, GroupNorm, ReLU, 3x3/2 max-pool SAME) and stages; stride 4 * 2 ** (stages - 1).

    Stages are ``body.block{s}.unit{u}``, as BiT's own PyTorch port names them.
    """

    def __init__(self, layers: list[int], width_factor: float):
        super().__init__()
        width = int(64 * width_factor)
        self.conv_root, self.gn_root = StdConv2d(3, width, 7, 2), group_norm(width)
        in_channels, stages = width, []
        for stage, block_size in enumerate(layers):
            units = []
            for unit in range(block_size):
                stride = 2 if stage > 0 and unit == 0 else 1
                units.append((f'unit{unit + 1}', BottleneckUnit(in_channels, width * 2 ** stage, stride)))
                in_channels = width * 2 ** stage * 4
            stages.append((f'block{stage + 1}', nn.Sequential(OrderedDict(units))))
        self.body = nn.Sequential(OrderedDict(stages))
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))
        top, bottom = same_padding(x.shape[2], 3, 2)
        left, right = same_padding(x.shape[3], 3, 2)
        x = F.max_pool2d(F.pad(x, [left, right, top, bottom], value=float('-inf')), 3, 2)  # Flax pads with -inf
        return self.body(x)


class ResNet(nn.Module):
    """The BiT ResNet classifier (``resnet26``, ``resnet50``): stem, global average pooling, head."""

    def __init__(self, num_classes: int, resnet_layers: list[int], resnet_width: float):
        super().__init__()
        self.resnet = ResNetStem(list(resnet_layers), resnet_width)
        self.head = nn.Linear(self.resnet.out_channels, num_classes) if num_classes else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.resnet(images).mean(dim=[2, 3])
        if self.head is None:
            return features
        return self.head(features)


# Transformer encoder (ViT eq. 2-4) ------------------------------------------------------------------------------------
class Attention(nn.Module):
    """softmax(q k^T / sqrt(d_head)) v with timm's fused qkv Linear ([q | k | v], head-major) and ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, dh)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU (tanh or exact, as the Flax field says) -> Linear."""

    def __init__(self, dim: int, hidden: int, gelu_approximate: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate='tanh' if gelu_approximate else 'none')
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool, gelu_approximate: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, gelu_approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# Stems: patches (ViT, DeiT, hybrids) and tokens-to-token (T2T-ViT) ----------------------------------------------------
class PatchEmbed(nn.Module):
    """p x p patches as a strided conv (timm's ``patch_embed.proj``), tokens row-major: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, in_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenAttention(nn.Module):
    """T2T's one-head token attention: scale dim ** -0.5 of the INPUT width, and the residual adds v."""

    def __init__(self, dim: int, token_dim: int):
        super().__init__()
        self.token_dim = token_dim
        self.scale = dim ** -0.5  # the original's head_dim = dim // num_heads with num_heads = 1
        self.qkv = nn.Linear(dim, 3 * token_dim, bias=False)
        self.proj = nn.Linear(token_dim, token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        t = self.token_dim
        q, k, v = qkv[..., :t], qkv[..., t:2 * t], qkv[..., 2 * t:]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return v + self.proj(attn @ v)  # the residual is v: the layer's input has another width


class TokenTransformer(nn.Module):
    """T2T's token Transformer layer: ``TokenAttention`` on LN(x), then ``x + MLP(LN(x))`` with hidden token_dim."""

    def __init__(self, dim: int, token_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TokenAttention(dim, token_dim)
        self.norm2 = nn.LayerNorm(token_dim, eps=eps)
        self.mlp = Mlp(token_dim, token_dim, gelu_approximate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPerformer(nn.Module):
    """T2T's token Performer: phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) with the frozen w; kqv split k, q, v."""

    def __init__(self, dim: int, token_dim: int, eps: float, kernel_ratio: float = 0.5):
        super().__init__()
        self.emb = token_dim
        self.m = int(token_dim * kernel_ratio)
        self.kqv = nn.Linear(dim, 3 * token_dim)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(token_dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim))
        self.w = nn.Parameter(torch.empty(self.m, token_dim), requires_grad=False)

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # the random features are computed in float32, as the original
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.t() - xd) / math.sqrt(self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kqv = self.kqv(self.norm1(x))
        k, q, v = kqv[..., :self.emb], kqv[..., self.emb:2 * self.emb], kqv[..., 2 * self.emb:]  # the original's order
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
        normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
        kptv = v.float().transpose(1, 2) @ kp  # (B, emb, m)
        y = (qp @ kptv.transpose(1, 2)) / (normaliser + 1e-8)
        x = v + self.proj(y)
        return x + self.mlp(self.norm2(x))


def unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class TokensToToken(nn.Module):
    """Soft split (Unfold 7x7/4) -> token layer -> re-structurize -> soft split (3x3/2), twice; Linear to D."""

    def __init__(self, hidden_size: int, token_dim: int, tokens_type: str, eps: float, in_channels: int = 3):
        super().__init__()
        layer = TokenPerformer if tokens_type == 'performer' else TokenTransformer
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = layer(in_channels * 7 * 7, token_dim, eps)
        self.attention2 = layer(token_dim * 3 * 3, token_dim, eps)
        self.project = nn.Linear(token_dim * 3 * 3, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = unfold_size(x.shape[2], 7, 4, 2), unfold_size(x.shape[3], 7, 4, 2)
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = self.soft_split1(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)).transpose(1, 2)
        h, w = unfold_size(h, 3, 2, 1), unfold_size(w, 3, 2, 1)
        x = self.attention2(x)
        x = self.soft_split2(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)).transpose(1, 2)
        return self.project(x)


# The Vision Transformer ----------------------------------------------------------------------------------------------
def sincos2d_posemb(h: int, w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's fixed 2D sin-cos position embedding, (1, h * w, dim) (as ``vit_jax.models.vit``)."""
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1))
    y = np.einsum('m,d->md', y.flatten(), omega)
    x = np.einsum('m,d->md', x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


class PreLogits(nn.Module):
    """The representation layer: Linear + tanh (timm's ``pre_logits.fc``)."""

    def __init__(self, dim: int, representation_size: int):
        super().__init__()
        self.fc = nn.Linear(dim, representation_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT / DeiT / T2T-ViT / hybrid, configured by the Flax ``VisionTransformer``'s fields."""

    def __init__(self, num_classes: int, image_size: int, patch_size: int, hidden_size: int, num_layers: int,
                 num_heads: int, mlp_dim: int, classifier: str = 'token', representation_size: int | None = None,
                 gelu_approximate: bool = True, layer_norm_eps: float = 1e-6, qkv_bias: bool = True,
                 posemb: str = 'learned', distilled: bool = False, stem: str = 'patch',
                 resnet_layers: tuple[int, ...] = (), resnet_width: float = 1.0, token_dim: int = 64,
                 tokens_type: str = 'performer', **_: Any):
        super().__init__()
        d = hidden_size
        self.classifier = classifier
        self.resnet: ResNetStem | None = None
        self.patch_embed: PatchEmbed | None = None
        self.tokens_to_token: TokensToToken | None = None
        if stem == 't2t':
            self.tokens_to_token = TokensToToken(d, token_dim, tokens_type, layer_norm_eps)
            grid = image_size // 16
        else:
            channels, stride = 3, 1
            if stem == 'resnet':
                self.resnet = ResNetStem(list(resnet_layers), resnet_width)
                channels, stride = self.resnet.out_channels, 4 * 2 ** max(len(resnet_layers) - 1, 0)
            self.patch_embed = PatchEmbed(channels, patch_size, d)
            grid = image_size // (stride * patch_size)

        token = classifier in ('token', 'token_unpooled')
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if distilled else None
        n = grid * grid + int(token) + int(distilled)
        # learned, or T2T's sinusoid table (a frozen parameter in its checkpoints); both cover the prefix tokens.
        self.pos_embed = (nn.Parameter(torch.zeros(1, n, d), requires_grad=posemb == 'learned')
                          if posemb in ('learned', 'sinusoid') else None)
        # big_vision's sincos2d is not a parameter and does not cover the prefix tokens.
        self.register_buffer('sincos2d_pos_embed', torch.from_numpy(sincos2d_posemb(grid, grid, d))
                             if posemb == 'sincos2d' else None, persistent=False)

        self.blocks = nn.ModuleList([Block(d, num_heads, mlp_dim, qkv_bias, gelu_approximate, layer_norm_eps)
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d, eps=layer_norm_eps)
        features = representation_size or d
        self.pre_logits = PreLogits(d, representation_size) if representation_size else None
        self.head = nn.Linear(features, num_classes) if num_classes else None
        self.head_dist = nn.Linear(d, num_classes) if num_classes and distilled else None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> patch tokens (B, N, D)."""
        if self.tokens_to_token is not None:
            return self.tokens_to_token(images)
        x = images
        if self.resnet is not None:
            x = self.resnet(x)
        assert self.patch_embed is not None
        return self.patch_embed(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        b = x.shape[0]
        if self.sincos2d_pos_embed is not None:
            x = x + self.sincos2d_pos_embed
        prefix: list[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        if len(prefix) > 0:
            x = torch.cat(prefix + [x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)

        if self.classifier == 'token':
            features = x[:, 0]
        elif self.classifier == 'gap':
            features = x.mean(dim=1)
        else:  # 'unpooled', 'token_unpooled': one output per token
            features = x
        if self.pre_logits is not None:
            features = self.pre_logits(features)
        if self.head is None:
            return features
        logits = self.head(features)
        if self.head_dist is not None:
            logits = (logits + self.head_dist(x[:, 1])) / 2  # DeiT inference: the average of the two heads
        return logits


def build(config: dict[str, Any]) -> nn.Module:
    """The torch module for a Flax model's fields (``{'module': 'VisionTransformer' | 'ResNet', field: value}``)."""
    fields = {k: v for k, v in config.items() if k != 'module'}
    if config['module'] == 'ResNet':
        return ResNet(fields['num_classes'], list(fields['resnet_layers']), fields['resnet_width']).eval()
    return VisionTransformer(**fields).eval()
