"""The deployment artefacts of a PyTorch mirror, as in the DeiT mobile tutorial: TorchScript fp32, dynamic int8 with
the qnnpack engine (TorchScript and lite interpreter), and the state dict as safetensors. No JAX here."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from vit_jax.export.convert import ExportError

FP32 = 'model_fp32.pt'
INT8 = 'model_int8_qnnpack.pt'
LITE = 'model_int8_qnnpack.ptl'
STATE_DICT = 'state_dict.safetensors'
REPORT = 'export_report.json'
FILES = (FP32, INT8, LITE, STATE_DICT, REPORT)


def require_qnnpack() -> None:
    """Raises ExportError when this torch build has no qnnpack engine (the mobile int8 kernels)."""
    engines = torch.backends.quantized.supported_engines
    if 'qnnpack' not in engines:
        raise ExportError(f'This torch build ({torch.__version__}) has no qnnpack quantized engine (supported: '
                          f'{engines}), so it cannot make the mobile int8 model: use a torch build with QNNPACK '
                          '(the official CPU wheels have it).')


@contextlib.contextmanager
def qnnpack() -> Iterator[None]:
    """Quantizes and runs int8 models with qnnpack, then restores the previous engine (a process-wide setting)."""
    require_qnnpack()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = 'qnnpack'
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch 2.13 warns on every use of eager quantization and the lite interpreter (deprecated, still shipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.simplefilter('ignore', UserWarning)
        yield


def quantize_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every nn.Linear (weights int8, activations quantized on the fly)."""
    require_qnnpack()
    with quiet():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {nn.Linear}, dtype=torch.qint8)


def mobile_optimize(scripted: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, str]:
    """``optimize_for_mobile`` where this torch build supports it; otherwise the module unchanged and the reason."""
    import torch.backends.xnnpack  # not imported by ``import torch``
    if not torch.backends.xnnpack.enabled:
        return scripted, (f'skipped: this torch build ({torch.__version__}) has no XNNPACK '
                          '(torch.backends.xnnpack.enabled is False), which optimize_for_mobile requires')
    from torch.utils.mobile_optimizer import optimize_for_mobile
    try:
        return optimize_for_mobile(scripted), 'applied (to the lite-interpreter file)'
    except Exception as e:  # e.g. an XNNPACK rewrite that this torch version asserts on
        return scripted, f'skipped: optimize_for_mobile failed: {type(e).__name__}: {str(e).splitlines()[0]}'


def write_models(module: nn.Module, directory: str) -> dict[str, str]:
    """Writes FP32, INT8 and LITE for ``module`` (eval mode) into ``directory``; returns notes for the report."""
    module = module.eval()
    with quiet():
        torch.jit.script(module).save(os.path.join(directory, FP32))
        with qnnpack():
            int8 = torch.jit.script(quantize_int8(module))
            int8.save(os.path.join(directory, INT8))
            lite, status = mobile_optimize(int8)
            lite._save_for_lite_interpreter(os.path.join(directory, LITE))
    return {'optimize_for_mobile': status}


def write_state_dict(arrays: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str]) -> None:
    """safetensors with ``format: pt`` (what timm and transformers expect) plus our metadata."""
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, path,
              metadata={'format': 'pt', **metadata})


def load_models(directory: str) -> dict[str, torch.nn.Module]:
    """The saved artefacts, loaded back as a deployment would: TorchScript fp32, int8 and the lite module."""
    import torch.jit.mobile  # not imported by ``import torch``
    with quiet():
        return {'torchscript_fp32': torch.jit.load(os.path.join(directory, FP32)),
                'int8_qnnpack': torch.jit.load(os.path.join(directory, INT8)),
                'int8_lite': torch.jit.mobile._load_for_lite_interpreter(os.path.join(directory, LITE))}
