"""The GPU path, compiled by the real GPU compiler on this CPU (deviceless AOT, jax-cuda12-plugin in its own prefix):
every shipped recipe's train step compiles for an H100 with cuDNN's fused attention at its own token count, and tiny
models of each family compile for H100 and A100 meshes in bf16 (cuDNN) and fp32 (XLA's attention). `make test`
compiles one case per path (FAST_RECIPES, FAST_TINY), `make test-slow` the others."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aot_cases import CONFIGS, TEACHER, TINY as TINY_OVERRIDES, ok, recipe_case, run_cases
from vit_jax.models import encoder


@pytest.mark.parametrize('n', [197, 198, 257, 577, 785])
def test_padded_attention_equals_unpadded_attention(n):
    """The padding cuDNN's backward needs (tokens to a multiple of 8, the padded keys masked, the padded queries
    dropped) changes nothing: values and gradients equal the unpadded attention's (here through XLA's implementation
    with the same lengths), at every ViT/DeiT token count, to fp32 rounding: 1e-5 of the largest value (XLA's attention
    computes its logits in fp32 even for fp64 inputs, and the sums over the padded length run in another order; a
    wrong mask is off by whole units)."""
    keys = jax.random.split(jax.random.key(n), 4)
    q, k, v, dout = (2.0 * jax.random.normal(key, (2, n, 3, 64), jnp.float32) for key in keys)

    def run(fn):  # the arrays as arguments, not constants (XLA would fold the attention at compile time)
        def values_and_grads(q, k, v, dout):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(dout))
        return jax.jit(values_and_grads)(q, k, v, dout)

    padded = run(lambda *a: encoder.padded_attention(*a, 0.125, 'xla'))
    plain = run(lambda *a: jax.nn.dot_product_attention(*a, scale=0.125, implementation='xla'))
    assert padded[0].shape == (2, n, 3, 64)
    for got, want, what in zip(padded, plain, ('out', 'dq', 'dk', 'dv')):
        assert np.isfinite(np.asarray(got)).all(), what
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()),
                                   err_msg=f'{what} at {n} tokens')


# The fast tier (`make test`) compiles one case of each path: a recipe at 197 tokens (the count cuDNN's backward
# refused unpadded; ViT in bf16 on one H100), each other family in bf16 on one H100, XLA's attention in fp32, an 8-GPU
# fsdp mesh (ViT's train and eval steps in bf16) and an A100; the slow tier every other recipe, resolution, dtype and
# mesh (the hybrid's ResNet stem alone compiles for ~70 s).
FAST_RECIPES = ('vit_b16.py',)
RECIPES = {**{name: recipe_case(name) for name in CONFIGS},
           'vit_b16.py 384 px': recipe_case('vit_b16.py', label=' 384 px', image_size=384),  # 577 tokens
           'deit_b16.py on an A100': recipe_case('deit_b16.py', topology='a100x1')}
TINY_FAMILIES = {
    'vit': ('quickstart.py', {}),
    'deit_distilled': ('deit_ti16_distilled.py', {**TEACHER, 'distillation.teacher.model.hidden_size': 64,
                                                  'distillation.teacher.model.num_heads': 2,
                                                  'distillation.teacher.model.mlp_dim': 128,
                                                  'distillation.teacher.model.num_layers': 1,
                                                  'image_size': 32, 'distillation.teacher.image_size': 32}),
    't2t': ('t2t_vit_14.py', {'image_size': 64, 'model.token_dim': 16}),
    'hybrid': ('r50_vit_b16.py', {'image_size': 64, 'model.resnet_width': 0.5}),
    'mae': ('mae_vit_b16.py', {'image_size': 32, 'model.patch_size': 8, 'mae.decoder_width': 32,
                               'mae.decoder_depth': 1, 'mae.decoder_heads': 2})}
MESHES = {'h100x1 data': ('h100x1', {}), 'h100x8 data': ('h100x8', {'mesh.data': 8}),
          'h100x8 fsdp': ('h100x8', {'mesh.data': 1, 'mesh.fsdp': 8}), 'a100x1 data': ('a100x1', {})}
FAST_TINY = ('vit float32 h100x1 data', 'vit bfloat16 h100x8 fsdp',
             'deit_distilled bfloat16 a100x1 data', 't2t bfloat16 h100x1 data', 'mae bfloat16 h100x1 data')
TINY = {}
for family, (config, overrides) in TINY_FAMILIES.items():
    for dtype in ('bfloat16', 'float32'):
        for mesh_name, (topology, mesh) in MESHES.items():
            if mesh_name != 'h100x1 data' and family not in ('vit', 'deit_distilled'):
                continue  # the mesh and the GPU generation are the encoder's business: ViT and DeiT cover them
            name = f'{family} {dtype} {mesh_name}'
            TINY[name] = {'name': name, 'config': f'configs/{config}', 'topology': topology,
                          'overrides': {**TINY_OVERRIDES, **overrides, **mesh, 'model.dtype': dtype}}


def tiered(names, fast):
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.fixture(scope='module')
def gpu(request, tmp_path_factory):
    cases = [{**case, 'slow': name not in FAST_RECIPES} for name, case in RECIPES.items()]
    cases += [{**case, 'slow': name not in FAST_TINY} for name, case in TINY.items()]
    return run_cases('gpu', cases, tmp_path_factory.mktemp('gpu'), request)


@pytest.mark.parametrize('name', tiered(RECIPES, FAST_RECIPES))
def test_every_recipe_trains_with_cudnn_attention_on_a_gpu(gpu, name):
    """Each shipped recipe's train step (bf16, at its own resolution; 197, 198, 257 or 577 tokens, MAE's kept
    patches) compiles for a GPU with cuDNN's fused attention forward and backward, and nothing of the CPU's."""
    result = ok(gpu, RECIPES[name]['name'])
    train = result['train']
    assert result['attention'] == 'cudnn' and result['platform'].startswith('cuda:')
    assert train['cudnn_attention_calls'] >= 2, 'forward and backward'
    assert train['cpu_kernel_calls'] == 0
    assert 0 < train['total_bytes'] < result['chip_memory_bytes']
    if 'A100' in name:
        assert result['platform'] == 'cuda:8.0'


@pytest.mark.parametrize('name', tiered(TINY, FAST_TINY))
def test_tiny_models_compile_for_gpus(gpu, name):
    """Train and eval steps of each family compile for one H100; ViT and DeiT also for 8 H100s (data and fsdp
    meshes) and an A100. bf16 runs cuDNN's attention, fp32 XLA's (cuDNN takes no fp32)."""
    result = ok(gpu, name)
    calls = result['train']['cudnn_attention_calls'] + result['eval']['cudnn_attention_calls']
    if ' bfloat16 ' in name:
        assert result['attention'] == 'cudnn' and calls >= 3  # train fwd + bwd, eval fwd
    else:
        assert result['attention'] == 'xla' and calls == 0
    assert result['train']['cpu_kernel_calls'] == result['eval']['cpu_kernel_calls'] == 0
    assert result['eval']['total_bytes'] > 0
    if ' h100x8 ' in name:
        sharded = result['train']['collectives']
        assert sharded['all-reduce']['count'] + sharded['reduce-scatter']['count'] > 0
        assert result['mesh'] == ({'data': 1, 'fsdp': 8, 'tensor': 1} if name.endswith('fsdp') else
                                  {'data': 8, 'fsdp': 1, 'tensor': 1})
    if ' a100x1 ' in name:
        assert result['platform'] == 'cuda:8.0'
