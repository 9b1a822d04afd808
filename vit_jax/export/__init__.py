"""vit_jax -> PyTorch for deployment (the DeiT mobile tutorial path): mirrors, TorchScript, int8 qnnpack, lite.

    module = to_torch(model, params)                 # a torch.nn.Module computing what model.apply computes
    report = export(params, model, 'out/vit_s16')    # the artefacts, measured against JAX (see ``pipeline``)

    python -m vit_jax.export --workdir WORKDIR --out OUTDIR
    python -m vit_jax.export --checkpoint ViT-S_16.npz --model vit_s16 --out OUTDIR

The PyTorch side (``torch_models``, ``convert``, ``artefacts``, ``report``) imports no JAX: a deployment, or a timm
user, needs only torch and this package. ``export`` (which runs JAX for the reference logits) is imported on use.
"""

from __future__ import annotations

from typing import Any

from vit_jax.export.artefacts import FILES, require_qnnpack
from vit_jax.export.convert import (ExportError, check_supported, checkpoint_arrays, family, model_config,
                                    to_torch, torch_state_dict)
from vit_jax.export.torch_models import build

__all__ = ['FILES', 'ExportError', 'build', 'check_supported', 'checkpoint_arrays', 'export', 'family',
           'model_config', 'require_qnnpack', 'to_torch', 'torch_state_dict']


def __getattr__(name: str) -> Any:
    if name == 'export':  # imports JAX
        from vit_jax.export.pipeline import export
        return export
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
