"""Exact parameter counts at 224 px / 1000 classes, against the published numbers (MODEL_SPEC.md).

Computed with ``jax.eval_shape``: nothing is allocated, so ViT-H/14 costs no more than ViT-Ti.
"""

import pytest

from vit_jax import models
from vit_jax.models.summary import count_params

EXPECTED = {
    # google-research/vision_transformer models_test.py (class-token head, no representation layer).
    'vit_ti16': 5_717_416, 'vit_s16': 22_050_664, 'vit_s32': 22_878_952, 'vit_b8': 86_576_872,
    'vit_b16': 86_567_656, 'vit_b32': 88_224_232, 'vit_l16': 304_326_632, 'vit_l32': 306_535_400,
    'vit_h14': 632_045_800,
    'r50_vit_b16': 98_659_112, 'r26_vit_s32': 36_431_912, 'r26_vit_b32': 101_383_976, 'r50_vit_l32': 328_994_856,
    # DeiT paper / facebookresearch/deit.
    'deit_ti16': 5_717_416, 'deit_s16': 22_050_664, 'deit_b16': 86_567_656,
    'deit_ti16_distilled': 5_910_800, 'deit_s16_distilled': 22_436_432, 'deit_b16_distilled': 87_338_192,
    # T2T-ViT README, including the frozen sinusoid table and Performer random features.
    't2t_vit_7': 4_310_222, 't2t_vit_10': 5_889_230, 't2t_vit_12': 6_941_902, 't2t_vit_14': 21_545_550,
    't2t_vit_19': 39_177_422, 't2t_vit_24': 64_105_934, 't2t_vit_t14': 21_541_070, 't2t_vit_t19': 39_172_942,
    't2t_vit_t24': 64_101_454,
    # BiT-style ResNets: no count is published for the vision_transformer ResNet alone. Derived from the published
    # hybrids: R50 stem = R50+ViT-L/32 - (ViT-L/32 - its 32x32x3 patch embedding + a 1x1 embedding from 2048
    # channels) = 23,508,032, plus a 2048 -> 1000 head = 25,557,032 (the well-known ResNet-50 count; GroupNorm has
    # BatchNorm's affine parameters). Likewise R26 from R26+ViT-B/32: 13,946,176 + 2,049,000.
    'resnet50': 25_557_032, 'resnet26': 15_995_176,
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_parameter_count(name):
    assert count_params(models.create_model(name, num_classes=1000)) == EXPECTED[name]


def test_every_registered_model_has_a_count():
    missing = [n for n in models.list_models() if n not in EXPECTED]
    assert not missing, f'registered without a parameter-count test: {missing}'


def test_gap_classifier_without_class_token():
    # vision_transformer: B/16 with classifier='gap' drops the class token and its position row.
    assert count_params(models.create_model('vit_b16', num_classes=1000, classifier='gap')) == 86_566_120


@pytest.mark.parametrize('name', sorted(n for n in EXPECTED if not n.startswith('resnet')))  # ResNets: no scan_layers
def test_scan_layers_keeps_the_count(name):
    """The model table counts scanned clones (models.summary.model_table): they must hold the same parameters."""
    model = models.create_model(name, num_classes=1000)
    assert count_params(model.clone(scan_layers=True)) == EXPECTED[name]
