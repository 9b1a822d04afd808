"""Throughput, FLOPs and utilisation of the train step, the forward pass and the input pipeline, beside PyTorch.

    python -m vit_jax.bench --model vit_s16 --batch 32 --image-size 224 --mode all --compare torch [--json OUT]

Every figure is a median over repeated steps after warm-up and compilation (compile time is reported separately).
The train step is the training system's own (``vit_jax.train.step``: forward, backward, AdamW update, sharded over all
devices on a data mesh). FLOPs per image come from XLA's cost analysis and are cross-checked against the analytic count
of a ViT; utilisation is achieved FLOP/s over the device's matmul peak, which the harness measures itself with a large
matmul in the same run (the better of XLA's dot and, on CPU, MKL's; with ``--dtype bfloat16`` the bf16 peak, and the
fp32 peak beside it). The CPU's model name and whether it has AMX are in the JSON: name the CPU beside every figure.
``--compare torch`` runs the same model in PyTorch (our exported mirror from
``vit_jax.export``, or with ``--torch-model huggingface`` transformers' ViT with SDPA attention) with AdamW, the
same batch, resolution and threads, in the same process, and reports ours / torch: PyTorch in fp32, and with
``--dtype bfloat16`` under bf16 autocast too (``ratio_torch_bf16_*``). All timed things take turns
within each round (ours, PyTorch's, the peak matmul), so a shared machine's drift in speed hits them alike.
It prints a table and, last, one JSON line with every figure, including XLA's memory plan of the train step
(``train_planned_bytes`` per device). ``--microbatches M`` runs the step as M slices of the batch in turn (the same
gradient; ``config.optimizer.microbatches``), and PyTorch's step likewise. ``--mode compile`` compiles the train
step without running it: compile time, FLOPs and the memory plan, e.g. whether ``vit_l16`` fits a batch.
``--mode matmuls`` times the train step beside each of its matmuls on its own (patch-stem ViTs): their sum is what
the step would take if norms, activations, softmax and the optimizer were free (``matmuls_alone_utilisation``), and
``train_over_matmuls_alone_s`` says how much more the step takes, i.e. whether its time goes to matmuls or to the rest.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

if __name__ == '__main__':  # before the heavy imports: this may re-execute the command once (see host_memory)
    from vit_jax import host_memory
    host_memory.configure_malloc()

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vit_jax import hardware, host_memory, models, sharding, timing  # noqa: E402
from vit_jax.kernels import cpu_attention, cpu_gemm  # noqa: E402
from vit_jax.kernels.build import cpu_flags, cpu_model  # noqa: E402
from vit_jax.models import encoder  # noqa: E402
from vit_jax.objectives import Supervised  # noqa: E402
from vit_jax.train.config import base_config, load_config  # noqa: E402
from vit_jax.train.optim import create_optimizer  # noqa: E402
from vit_jax.train.step import abstract_state, init_state, make_train_step  # noqa: E402


PEAK = 'matmul_peak'  # runners named f'{PEAK}:{dtype}:{library}'


def matmul_peak(dtype: str) -> tuple[float, dict[str, Callable[[], Any]]]:
    """FLOPs of a large square matmul and runners for it, through XLA's dot and, on CPU, MKL's (``kernels/cpu_gemm``):
    the device's matmul peak in this dtype is FLOPs over the best time either took."""
    n = 2048 if jax.default_backend() == 'cpu' else 8192
    a = jnp.ones((n, n), dtype)
    # bf16 accumulates in fp32, as the model's products do (cpu_gemm.xla_product; XLA:CPU's fast bf16 path).
    products = {'xla': jax.jit(cpu_gemm.xla_product if jax.default_backend() == 'cpu' else lambda x, y: x @ y)}
    if jax.default_backend() == 'cpu' and cpu_gemm.available():
        products['mkl'] = jax.jit(cpu_gemm.mkl_product)
    return 2.0 * n ** 3, {f'{PEAK}:{dtype}:{name}': lambda f=f: f(a, a).block_until_ready()
                          for name, f in products.items()}


def best_peak(flops: float, times: dict[str, list[float]], dtype: str) -> tuple[float, str]:
    """The peak in this dtype (the best any of its runners did: utilisation errs on the low side) and its library."""
    best = min((min(t), name.rsplit(':', 1)[1]) for name, t in times.items() if name.startswith(f'{PEAK}:{dtype}:'))
    return flops / best[0], best[1]


def analytic_vit_flops(model) -> float | None:
    """Forward FLOPs of one image for a patch-stem ViT (2 per multiply-add), for cross-checking XLA's count."""
    if not isinstance(model, models.VisionTransformer) or model.stem != 'patch':
        return None
    d, m, layers = model.hidden_size, model.mlp_dim, model.num_layers
    n = model.grid_size ** 2 + model.num_prefix_tokens
    patch = model.patch_size ** 2 * 3 * d * model.grid_size ** 2
    per_layer = n * (4 * d * d + 2 * d * m) + 2 * n * n * d  # qkv + out, MLP, q k^T and attn v
    head = d * model.num_classes
    return 2.0 * (patch + layers * per_layer + head)


# The attention's matmuls among vit_matmuls': q k^T and attn v, and their backward pass.
ATTENTION_MATMULS = ('q k^T', 'attn v', 'd attn', 'd v', 'd q', 'd k')
ATTENTION_KERNEL = 'attention kernel'  # the CPU kernel's forward and backward, in place of the six above


def vit_matmuls(model, batch: int, num_classes: int) -> list[tuple[str, str, tuple, tuple, int]]:
    """Every matmul of a patch-stem ViT's train step at a batch: (name, einsum, lhs shape, rhs shape, count).

    Forward, input gradient (dx) and weight gradient (dW) of the patch embedding (no dx: the images need none), of
    each layer's qkv, output and MLP projections, of the pre-logits layer if any and of the head (DeiT's two heads),
    and the attention's q k^T and attn v with the four matmuls of their backward pass, in the layouts autodiff gives
    them.
    """
    if not isinstance(model, models.VisionTransformer) or model.stem != 'patch':
        raise ValueError(f'--mode matmuls lists the matmuls of a patch-stem ViT; {type(model).__name__} with stem '
                         f'{getattr(model, "stem", None)!r} is not one.')
    d, m, h, layers = model.hidden_size, model.mlp_dim, model.num_heads, model.num_layers
    patches = batch * model.grid_size ** 2
    tokens = batch * (model.grid_size ** 2 + model.num_prefix_tokens)
    pixels = model.patch_size ** 2 * 3

    def dense(name, rows, fan_in, fan_out, count, input_grad=True):
        return ([(f'{name} fwd', 'ik,kj->ij', (rows, fan_in), (fan_in, fan_out), count)]
                + [(f'{name} dx', 'ik,jk->ij', (rows, fan_out), (fan_in, fan_out), count)] * input_grad
                + [(f'{name} dW', 'ij,ik->jk', (rows, fan_in), (rows, fan_out), count)])

    heads, scores = (batch, h, tokens // batch, d // h), (batch, h, tokens // batch, tokens // batch)
    features = model.representation_size or d
    pre_logits = dense('pre_logits', batch, d, features, 1) if model.representation_size else []
    return (dense('patch', patches, pixels, d, 1, input_grad=False)
            + dense('qkv', tokens, d, 3 * d, layers) + dense('out', tokens, d, d, layers)
            + dense('fc1', tokens, d, m, layers) + dense('fc2', tokens, m, d, layers)
            + [('q k^T', 'bhqd,bhkd->bhqk', heads, heads, layers), ('attn v', 'bhqk,bhkd->bhqd', scores, heads, layers),
               ('d attn', 'bhqd,bhkd->bhqk', heads, heads, layers), ('d v', 'bhqk,bhqd->bhkd', scores, heads, layers),
               ('d q', 'bhqk,bhkd->bhqd', scores, heads, layers), ('d k', 'bhqk,bhqd->bhkd', scores, heads, layers)]
            + pre_logits + dense('head', batch, features, num_classes, 1 + int(model.distilled)))


TOKEN_PROJECTIONS = ('qkv', 'out', 'fc1', 'fc2')  # through models/encoder.token_dot_general, so MKL or XLA
DENSE_TRANSPOSES = {'ik,kj->ij': (False, False), 'ik,jk->ij': (False, True), 'ij,ik->jk': (True, False)}


def _step_product(equation: str, lhs_shape, rhs_shape, dtype) -> str | None:
    """On CPU, the candidate the train step runs this dense product through (``cpu_gemm.implementation``, as measured
    at its shape; its 'xla' in fp32 is the step's plain dot); None elsewhere."""
    if not cpu_gemm.applies(dtype):
        return None
    trans_a, trans_b = DENSE_TRANSPOSES[equation]
    rows, depth = lhs_shape[::-1] if trans_a else lhs_shape
    cols = rhs_shape[0] if trans_b else rhs_shape[1]
    return cpu_gemm.implementation(dtype, rows, depth, cols, trans_a, trans_b)


def prepare_matmuls(model, args) -> tuple[dict[str, tuple[float, int]], dict[str, Callable[[], Any]]]:
    """Each matmul of the train step (``vit_matmuls``) jitted on its own, at one device's share of one micro-batch.

    Returns each one's FLOPs (XLA's count) and how many times a step runs it, and a runner for each. A projection
    the step runs through MKL is timed through MKL. Where the step runs attention through the CPU kernel, the kernel's forward and backward are timed as one (``ATTENTION_KERNEL``,
    credited with the model FLOPs of the six attention matmuls it does) instead of XLA's six.
    """
    slice_batch = args.batch // jax.device_count() // args.microbatches
    heads = model.hidden_size // model.num_heads
    kernel = cpu_attention.supports(args.dtype, heads)
    rng = np.random.default_rng(0)
    flops, runners, attention = {}, {}, []
    for name, equation, lhs_shape, rhs_shape, count in vit_matmuls(model, slice_batch, args.num_classes):
        lhs, rhs = (jnp.asarray(rng.normal(size=s), args.dtype) for s in (lhs_shape, rhs_shape))
        lowered = jax.jit(lambda a, b, equation=equation: jnp.einsum(equation, a, b)).lower(lhs, rhs)
        product_name = (_step_product(equation, lhs_shape, rhs_shape, args.dtype)
                        if name.split()[0] in TOKEN_PROJECTIONS else None)
        if product_name is not None:
            # Timed as the step runs it on CPU (cpu_gemm's measured candidate: MKL, a transposed copy, or XLA's dot
            # with bf16 accumulating in fp32), with XLA's FLOP count.
            trans_a, trans_b = DENSE_TRANSPOSES[equation]
            product = jax.jit(functools.partial(cpu_gemm.run_product, product_name, trans_a=trans_a,
                                                trans_b=trans_b))
            flops[name] = (float(lowered.cost_analysis().get('flops', 0.0)), count * args.microbatches)
            runners[f'matmul:{name}'] = lambda lhs=lhs, rhs=rhs, f=product: f(lhs, rhs).block_until_ready()
            continue
        if kernel and name in ATTENTION_MATMULS:  # counted, not run: the kernel does this matmul
            attention.append((float(lowered.cost_analysis().get('flops', 0.0)), count * args.microbatches))
            continue
        compiled = lowered.compile()
        flops[name] = (float(compiled.cost_analysis().get('flops', 0.0)), count * args.microbatches)
        runners[f'matmul:{name}'] = lambda compiled=compiled, lhs=lhs, rhs=rhs: compiled(lhs, rhs).block_until_ready()
    if kernel:
        flops[ATTENTION_KERNEL] = (sum(f for f, _ in attention), attention[0][1])
        tokens = model.grid_size ** 2 + model.num_prefix_tokens
        qkv = jnp.asarray(rng.normal(size=(slice_batch, tokens, 3, model.num_heads, heads)), args.dtype)
        dout = qkv[:, :, 0]

        @jax.jit
        def fused(qkv, dout):
            _, vjp = jax.vjp(lambda x: cpu_attention.attention(x, heads ** -0.5), qkv)
            return vjp(dout)[0]

        runners[f'matmul:{ATTENTION_KERNEL}'] = lambda: fused(qkv, dout).block_until_ready()
    return flops, runners


def matmuls_alone(flops: dict[str, tuple[float, int]], seconds: dict[str, float], peak: float, batch: int,
                 ) -> dict[str, Any]:
    """The train step's matmuls on their own: their median times, each call alone, summed, against the peak.

    Everything else in the step (norms, GELU, softmax, residual adds, the optimizer) is counted as free:
    ``train_step_s - matmuls_alone_step_s`` estimates what the rest costs, and ``matmuls_alone_utilisation`` what the
    step would reach with the rest free and each matmul as fast as alone. It is an estimate, not a bound: inside the
    step a matmul may find its operands in cache, and on a tiny model the calls alone are mostly dispatch (tens of
    microseconds each), so there the fused step beats their sum.
    """
    per_device_batch = batch // jax.device_count()
    total_s = total_flops = attention_s = attention_flops = 0.0
    detail = {}
    for name, (f, count) in flops.items():
        s = seconds[f'matmul:{name}']
        detail[name] = round(f / s / peak, 3)
        total_s, total_flops = total_s + s * count, total_flops + f * count
        if name in ATTENTION_MATMULS or name == ATTENTION_KERNEL:
            attention_s, attention_flops = attention_s + s * count, attention_flops + f * count
    dense_s, dense_flops = total_s - attention_s, total_flops - attention_flops
    return dict(matmuls_alone_step_s=total_s, matmuls_alone_flops_per_image=total_flops / per_device_batch,
                matmuls_alone_utilisation=total_flops / total_s / peak,
                matmuls_alone_attention_s=attention_s,
                matmuls_alone_attention_utilisation=attention_flops / attention_s / peak,
                matmuls_alone_dense_utilisation=dense_flops / dense_s / peak,
                matmul_utilisation=detail)


def host_peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get('peak_bytes_in_use')


def build_model(args) -> Any:
    overrides = dict(kv.split('=', 1) for kv in args.override)
    overrides = {k: _parse(v) for k, v in overrides.items()}
    return models.create_model(args.model, num_classes=args.num_classes, image_size=args.image_size,
                               dtype=args.dtype, **{'platform': hardware.host_platform(), **overrides})


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {'true': True, 'false': False, 'none': None}.get(value.lower(), value)


def prepare_train(model, args) -> tuple[dict[str, float], Callable[[], Any]]:
    """The training system's jitted train step on synthetic data, over all devices on a data mesh.

    Returns the figures known once it is compiled (compile time, model FLOPs, memory plan) and a runner for one step.
    """
    mesh = sharding.create_mesh()
    if args.batch % mesh.size:
        raise ValueError(f'--batch {args.batch} does not split over the {mesh.size} devices of the data mesh: give a '
                         f'multiple of {mesh.size}.')
    opt = base_config().optimizer
    opt.update(name='adamw', learning_rate=1e-3, weight_decay=0.05, warmup_steps=10, grad_clip_norm=1.0)
    tx, schedule = create_optimizer(opt, 1000)
    state, shardings = init_state(model, tx, mesh, args.image_size, seed=0, use_ema=False)
    step = make_train_step(Supervised(model), tx, shardings, mesh, schedule, seed=0, ema_decay=0.0,
                           microbatches=args.microbatches)
    rng = np.random.default_rng(0)
    batch = {'images': rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32),
             'labels': np.eye(args.num_classes, dtype=np.float32)[rng.integers(0, args.num_classes, args.batch)]}
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = model_train_flops(model, lowered, args.microbatches, tx, mesh, schedule, batch, args.image_size)
    holder = [state]
    fixed = {'train_compile_s': compile_s, 'train_flops_per_image': flops / args.batch, 'train_devices': mesh.size,
             **planned_memory(compiled, 'train')}

    def run():
        holder[0], metrics = compiled(holder[0], batch)
        metrics['train_loss'].block_until_ready()

    return fixed, run


def model_train_flops(model, lowered, microbatches: int, tx, mesh, schedule, batch, image_size: int) -> float:
    """XLA's count of one train step's model FLOPs (all devices together), on the step's unrolled twin.

    XLA's cost analysis counts the body of a loop once, so a step that scans over layers (``scan_layers``) or over
    micro-batches would be undercounted: the twin has neither, and no remat (whose recomputation is not model work).
    Nor does it see into a custom call: the twin's attention and projections run through XLA's ops, not the CPU
    kernel or MKL. It is only
    lowered, never compiled or run; a step with none of them is its own twin (``lowered``).
    """
    # The lowered program is the global one, before it is partitioned over the mesh: its count is the whole step's.
    loops = {f: False for f in ('scan_layers', 'remat') if getattr(model, f, False)}
    if not loops and microbatches == 1 and not (cpu_attention.available() or cpu_gemm.available()):
        return float(lowered.cost_analysis().get('flops', 0.0))
    with cpu_attention.xla_attention(), cpu_gemm.xla_gemm():
        twin = model.clone(**loops)
        state = abstract_state(twin, tx, mesh, image_size, use_ema=False)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step = make_train_step(Supervised(twin), tx, shardings, mesh, schedule, seed=0, ema_decay=0.0)
        return float(step.lower(state, batch).cost_analysis().get('flops', 0.0))


def planned_memory(compiled, prefix: str) -> dict[str, int]:
    """XLA's memory plan of a compiled program, per device: in all, and its temporaries (activations and the like).

    Known at compile time, so ``--mode compile`` says whether a batch fits a device without running it; it is the
    plan of the backend that compiled it (a CPU plan only approximates a GPU's).
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    # Arguments (the state, the batch) + outputs (the donated state aliases its input) + temporaries.
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    return {f'{prefix}_planned_bytes': int(total), f'{prefix}_planned_temp_bytes': int(stats.temp_size_in_bytes)}


def prepare_infer(model, args) -> tuple[dict[str, float], dict[str, Callable[[], Any]]]:
    """The jitted forward at the benchmark batch and at batch 1 (for latency)."""
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, args.image_size, args.image_size, 3)))
    forward = jax.jit(lambda p, x: model.apply(p, x))
    fixed, runners = {}, {}
    for batch, name in ((args.batch, 'infer'), (1, 'infer_batch1')):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, args.image_size, args.image_size, 3)),
                        jnp.float32)
        start = time.perf_counter()
        compiled = forward.lower(params, x).compile()
        if batch == args.batch:
            fixed['infer_compile_s'] = time.perf_counter() - start
            counted = compiled
            if cpu_attention.available() or cpu_gemm.available():  # XLA's count does not see into custom calls
                with cpu_attention.xla_attention(), cpu_gemm.xla_gemm():  # a new jit: jit caches its trace
                    counted = jax.jit(lambda p, x: model.apply(p, x)).lower(params, x)
            fixed['infer_flops_per_step'] = float(counted.cost_analysis().get('flops', 0.0))
        runners[name] = lambda compiled=compiled, x=x: compiled(params, x).block_until_ready()
    return fixed, runners


def bench_data(args) -> dict[str, float]:
    """The input pipeline alone (``--config``'s dataset and augmentation, at the benchmark batch and size)."""
    from vit_jax import data
    config = load_config(args.config)
    config.batch_size = args.batch
    config.image_size = args.image_size
    if args.data_dir:
        config.data_dir = args.data_dir
    if args.dataset:  # e.g. 'folder:/path' to measure a recipe's augmentation where its dataset is not prepared
        config.dataset, config.train_split = args.dataset, 'train'
    it = data.train_iterator(config, seed=0)
    # tf.data's autotuner ramps its parallelism up over the first batches: warm up long enough to see its rate.
    for _ in range(max(args.warmup * 5, 50)):
        next(it)
    n = max(args.steps * 5, 200)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    seconds = time.perf_counter() - start
    return {'data_images_per_s': n * args.batch / seconds, 'data_dataset': config.dataset}


def torch_reference(model, args) -> tuple[str, Callable[[], Any]]:
    """Which PyTorch model ``--compare torch`` runs, and a factory of fresh instances of it.

    ``export``: our own PyTorch mirror of the model (``vit_jax.export``; every family it supports, explicit-softmax
    attention). ``huggingface``: transformers' ViT with the same config and SDPA attention (patch-stem ViT only).
    ``auto`` takes ``export`` where it supports the model, else ``huggingface``.
    """
    from vit_jax.export import convert
    choice = args.torch_model
    if choice == 'auto':
        try:
            convert.check_supported(convert.model_config(model))
            choice = 'export'
        except convert.ExportError:
            choice = 'huggingface'
    if choice == 'export':
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, args.image_size, args.image_size, 3)))
        params = jax.device_get(params['params'])
        return 'export', lambda: convert.to_torch(model, params)
    import transformers
    if not isinstance(model, models.VisionTransformer) or model.stem != 'patch' or model.distilled:
        raise ValueError(f'--torch-model huggingface supports patch-stem ViT models; {args.model} is not one '
                         f'(use --torch-model export).')
    config = transformers.ViTConfig(
        hidden_size=model.hidden_size, num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
        intermediate_size=model.mlp_dim, image_size=args.image_size, patch_size=model.patch_size,
        num_labels=args.num_classes, hidden_act='gelu_pytorch_tanh' if model.gelu_approximate else 'gelu',
        layer_norm_eps=model.layer_norm_eps, attn_implementation='sdpa')

    class Logits(transformers.ViTForImageClassification):
        def forward(self, images):  # noqa: D102 (the same call as our exported module)
            return super().forward(pixel_values=images).logits

    return 'huggingface', lambda: Logits(config)


def prepare_torch(model, args, modes: set[str]) -> tuple[str, dict[str, Callable[[], Any]]]:
    """Runners for the same model in PyTorch (see ``torch_reference``), AdamW, same batch, size and threads.

    PyTorch runs where JAX does: on the GPU when JAX's backend is one and this PyTorch build has CUDA.
    """
    import torch
    torch.set_num_threads(args.threads)
    if jax.default_backend() == 'gpu' and not torch.cuda.is_available():
        raise ValueError('JAX runs on a GPU but this PyTorch build has no CUDA: --compare torch would compare a GPU '
                         'with the CPU. Install a CUDA build of torch, or drop --compare torch.')
    device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    reference, build = torch_reference(model, args)
    train_net, eval_net = build().to(device), build().to(device).eval()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    # PyTorch in fp32 ('torch_*') always; with --dtype bfloat16 also under bf16 autocast ('torch_bf16_*'): fp32
    # master weights and bf16 matmuls, as ours.
    variants = {'torch': None, **({'torch_bf16': torch.bfloat16} if args.dtype == 'bfloat16' else {})}
    runners = {}
    optimizer = torch.optim.AdamW(train_net.parameters(), lr=1e-3, weight_decay=0.05)
    train_net.train()
    for prefix, dtype in variants.items():
        if 'train' in modes:
            def step(dtype=dtype):  # with --microbatches, the same slices in turn: the batch's gradient, as ours
                optimizer.zero_grad(set_to_none=True)
                for x, y in zip(images.chunk(args.microbatches), labels.chunk(args.microbatches)):
                    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                        loss = torch.nn.functional.cross_entropy(train_net(x), y) / args.microbatches
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(train_net.parameters(), 1.0)
                optimizer.step()
                sync()

            runners[f'{prefix}_train'] = step
        if 'infer' in modes:
            for batch, name in ((args.batch, f'{prefix}_infer'), (1, f'{prefix}_infer_batch1')):
                def forward(x=images[:batch], dtype=dtype):
                    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                        eval_net(x)
                    sync()

                runners[name] = forward
    return reference, runners


def run(args) -> dict[str, Any]:
    model = build_model(args)
    result: dict[str, Any] = dict(
        model=args.model, overrides=args.override, batch=args.batch, image_size=args.image_size, dtype=args.dtype,
        mode=args.mode, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
        cpu_model=cpu_model(), cpu_amx='amx_bf16' in cpu_flags().split(),
        num_devices=jax.device_count(), microbatches=args.microbatches, threads=args.threads,
        malloc_tuned=host_memory.malloc_configured(),
        cpu_attention_kernel=cpu_attention.available(), cpu_gemm=cpu_gemm.available(), platform=model.platform,
        # What 'auto' (or the override) runs at this batch: 'cudnn', 'cpu_kernel' or 'xla'.
        attention=encoder.resolve_attention(
            model.attention_impl, model.dtype, model.hidden_size // model.num_heads,
            (args.batch, model.grid_size ** 2 + model.num_prefix_tokens, model.num_heads), model.platform))
    if args.mode == 'compile':
        # The train step compiled, not run: compile time, model FLOPs and XLA's memory plan, i.e. whether a model and
        # batch fit a device (e.g. vit_l16 at batch 128 with --override scan_layers=true --override remat=true).
        result.update(prepare_train(model, args)[0], host_peak_memory_bytes=host_peak_memory_bytes())
        return result
    # matmuls: the train step beside its matmuls timed on their own (where its time goes, see matmuls_alone).
    modes = {'all': {'train', 'infer', 'data'}, 'matmuls': {'train', 'matmuls'}}.get(args.mode, {args.mode})
    # The peak in the step's dtype, and in fp32 too for a bf16 step (bf16's peak is several times fp32's on AMX).
    peak_dtypes = list(dict.fromkeys((args.dtype, 'float32')))
    runners = {}
    for dtype in peak_dtypes:
        peak_flops, peak_runners = matmul_peak(dtype)
        runners.update(peak_runners)
    if 'matmuls' in modes:  # first: it says before the step compiles if the model is not a patch-stem ViT
        matmul_flops, matmul_runners = prepare_matmuls(model, args)
        runners.update(matmul_runners)
    if 'train' in modes:
        train_fixed, runners['train'] = prepare_train(model, args)
        result.update(train_fixed)
    if 'infer' in modes:
        infer_fixed, infer_runners = prepare_infer(model, args)
        runners.update(infer_runners)
    if args.compare == 'torch':
        result['torch_model'], torch_runners = prepare_torch(model, args, modes)
        runners.update(torch_runners)
    # Ours, PyTorch's and the peak matmul take turns, so the machine's drift in speed hits them alike.
    times = timing.round_robin_seconds(runners, args.warmup, args.steps)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    # Each round's seconds beside the medians: the spread (on a shared machine a step can take twice the median).
    result['seconds_per_round'] = {name: [round(x, 6) for x in t] for name, t in times.items()
                                   if not name.startswith('matmul:')}

    # The peak is the best the matmul did (the median of everything else): utilisation errs on the low side.
    peak, result['matmul_peak_library'] = best_peak(peak_flops, times, args.dtype)
    result['matmul_peak_flops_per_s'] = peak
    if args.dtype != 'float32':
        result['matmul_peak_float32_flops_per_s'] = best_peak(peak_flops, times, 'float32')[0]
    if 'train' in modes:
        result.update(train_step_s=seconds['train'], train_images_per_s=args.batch / seconds['train'],
                      train_flops_per_s=result['train_flops_per_image'] * args.batch / seconds['train'])
        result['train_utilisation'] = result['train_flops_per_s'] / (peak * result['train_devices'])
    if 'matmuls' in modes:
        result.update(matmuls_alone(matmul_flops, seconds, peak, args.batch))
        result['train_over_matmuls_alone_s'] = result['train_step_s'] / result['matmuls_alone_step_s']
    if 'infer' in modes:
        flops = infer_fixed['infer_flops_per_step']
        result.update(infer_compile_s=infer_fixed['infer_compile_s'], infer_images_per_s=args.batch / seconds['infer'],
                      infer_flops_per_image=flops / args.batch, infer_flops_per_s=flops / seconds['infer'],
                      infer_latency_ms_batch1=1e3 * seconds['infer_batch1'])
        result['infer_utilisation'] = result['infer_flops_per_s'] / peak
    analytic = analytic_vit_flops(model)
    if analytic:
        result['analytic_forward_flops_per_image'] = analytic
        if 'infer_flops_per_image' in result:
            result['xla_over_analytic_forward_flops'] = result['infer_flops_per_image'] / analytic
    if 'data' in modes:
        result.update(bench_data(args))
        if 'train_images_per_s' in result:
            result['data_over_train_images_per_s'] = result['data_images_per_s'] / result['train_images_per_s']
    if args.compare == 'torch':
        for mode in ('train', 'infer'):
            for prefix, ratio in (('torch', 'ratio'), ('torch_bf16', 'ratio_torch_bf16')):
                if f'{prefix}_{mode}' in seconds:
                    result[f'{prefix}_{mode}_images_per_s'] = args.batch / seconds[f'{prefix}_{mode}']
                    result[f'{ratio}_{mode}_images_per_s'] = (result[f'{mode}_images_per_s'] /
                                                              result[f'{prefix}_{mode}_images_per_s'])
        if 'torch_bf16_infer_batch1' in seconds:
            result['torch_bf16_infer_latency_ms_batch1'] = 1e3 * seconds['torch_bf16_infer_batch1']
        if 'torch_infer_batch1' in seconds:
            result['torch_infer_latency_ms_batch1'] = 1e3 * seconds['torch_infer_batch1']
            result['ratio_infer_latency_batch1'] = (result['infer_latency_ms_batch1'] /
                                                    result['torch_infer_latency_ms_batch1'])
    result['host_peak_memory_bytes'] = host_peak_memory_bytes()
    result['device_peak_memory_bytes'] = device_peak_memory_bytes()
    return result


def table(result: dict[str, Any]) -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, float):
            text = f'{value:.4g}' if abs(value) < 1e5 else f'{value:.4e}'
        else:
            text = str(value)
        lines.append(f'{key:<40} {text}')
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_ti16')
    parser.add_argument('--override', action='append', default=[], metavar='FIELD=VALUE',
                        help='a create_model override, e.g. --override num_layers=2 (repeatable)')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--microbatches', type=int, default=1,
                        help='the train step computes its batch in this many slices in turn (the same gradient; '
                             "config.optimizer.microbatches); PyTorch's step does the same")
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--mode', choices=('train', 'infer', 'data', 'all', 'compile', 'matmuls'), default='all',
                        help='compile: compile the train step without running it (compile time, FLOPs, memory plan); '
                             'matmuls: the train step beside each of its matmuls timed on its own (what the step '
                             'would take if all else were free; patch-stem ViTs)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    parser.add_argument('--compare', choices=('none', 'torch'), default='none')
    parser.add_argument('--torch-model', choices=('auto', 'export', 'huggingface'), default='auto',
                        help="--compare torch's model: our exported PyTorch mirror (vit_jax.export) where it exists "
                             "(auto), or Hugging Face transformers' ViT with SDPA attention")
    parser.add_argument('--config', default='configs/quickstart.py', help='the recipe whose input pipeline --mode '
                                                                          'data measures')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--dataset', default=None, help="replaces the recipe's dataset (train split 'train')")
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--json', default=None, help='also write the JSON to this file')
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    line = json.dumps(result)
    if args.json:
        with open(args.json, 'w') as f:
            f.write(line + '\n')
    print(line)
    sys.stdout.flush()
    return result


if __name__ == '__main__':
    main()
