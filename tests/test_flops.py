"""The analytic FLOP count against the ViT paper's Table 6 (pretraining exaFLOPs on JFT-300M) and XLA's count."""

import jax
import jax.numpy as jnp
import pytest

from vit_jax import models
from vit_jax.models.flops import JFT_CLASSES, JFT_IMAGES, train_flops

# (model, epochs of JFT-300M, Table 6 exaFLOPs, how Table 6 counted a ResNet's strides)
TABLE_6 = [('vit_b32', 7, 55, '3x3'), ('vit_b16', 7, 224, '3x3'), ('vit_l32', 7, 196, '3x3'),
           ('vit_l16', 7, 783, '3x3'), ('vit_l16', 14, 1567, '3x3'), ('vit_h14', 14, 4262, '3x3'),
           ('resnet50', 7, 50, '1x1')]


@pytest.mark.parametrize('name,epochs,exaflops,stride_on', TABLE_6)
def test_table_6_pretraining_compute(name, epochs, exaflops, stride_on):
    ours = train_flops(name, 224, epochs * JFT_IMAGES, JFT_CLASSES, resnet_stride_on=stride_on) / 1e18
    assert ours == pytest.approx(exaflops, rel=0.03)


def test_vit_b16_forward_is_17_6_gmacs():
    # The figure every ViT table quotes for B/16 at 224 px ("17.6 GFLOPs", counting multiply-adds).
    assert models.flops('vit_b16', 224) / 2 / 1e9 == pytest.approx(17.56, abs=0.01)


def test_bit_resnet50_costs_5_percent_more_than_table_6_counted():
    ours = train_flops('resnet50', 224, 7 * JFT_IMAGES, JFT_CLASSES) / 1e18
    assert ours == pytest.approx(52.5, abs=0.1)  # the stride on the 3x3 conv, as built: Table 6 says 50


def test_flops_follow_image_size_and_module():
    model = models.create_model('vit_s16', num_classes=10, image_size=32)
    assert models.flops(model) == models.flops('vit_s16', 32, num_classes=10)
    assert models.flops(model, 224) == models.flops('vit_s16', 224, num_classes=10)


@pytest.mark.parametrize('name, overrides', [('vit_ti16', {}),
                                             ('r26_vit_s32', {'resnet_layers': (1, 1), 'resnet_width': 0.5})])
def test_analytic_count_is_close_to_xla_forward(name, overrides):
    """A ViT, and a hybrid (its ResNet stem's convolutions counted too)."""
    model = models.create_model(name, num_classes=10, image_size=32, num_layers=2, **overrides)
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    xla = jax.jit(model.apply).lower(params, x).cost_analysis()['flops']
    # XLA also counts norms, softmax, GELU and adds: about 1% more than the matmuls alone here (the hybrid's stem is
    # 6% of its count: leaving it out would be caught).
    assert 1.0 < xla / models.flops(model) < 1.03


def test_t2t_has_no_analytic_count():
    with pytest.raises(ValueError, match='python -m vit_jax.bench --mode compile'):
        models.flops('t2t_vit_7', 224)
