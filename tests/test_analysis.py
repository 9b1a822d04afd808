"""Looking inside a model: rollout, attention distance, position embeddings and filters against hand computations."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from vit_jax import models
from vit_jax.analysis import (NotApplicableError, attention_rollout, cosine_similarity, discard_lowest,
                              embedding_filters, encoder_attention, fuse_heads, mean_attention_distance,
                              patch_position_embeddings, token_map)
from vit_jax.analysis.loading import Loaded, public_eval_augment
from vit_jax.models.t2t import sinusoid_table

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


# Attention rollout -------------------------------------------------------------------------------------------------
def test_rollout_of_uniform_attention_is_the_closed_form():
    """((U + I) / 2)^L = 0.5^L I + (1 - 0.5^L) U for U = 1/N everywhere (U^2 = U)."""
    layers, n = 12, 197
    attentions = np.full((layers, 1, 3, n, n), 1.0 / n)
    joint = attention_rollout(attentions)[0]
    expected = 0.5 ** layers * np.eye(n) + (1 - 0.5 ** layers) / n
    np.testing.assert_allclose(joint, expected, rtol=0, atol=1e-14)
    assert joint[0, 1] == pytest.approx(0.0050749028, abs=1e-10)  # class token -> a patch
    np.testing.assert_allclose(joint.sum(axis=-1), 1.0, atol=1e-12)


def test_rollout_of_identity_attention_is_the_identity():
    attentions = np.broadcast_to(np.eye(17), (4, 2, 3, 17, 17))
    for fusion in ('mean', 'max', 'min'):
        np.testing.assert_array_equal(attention_rollout(attentions, fusion), np.broadcast_to(np.eye(17), (2, 17, 17)))


def test_rollout_is_the_product_of_the_layers_from_last_to_first():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(5), size=(2, 1, 1, 5))  # (L=2, B=1, H=1, 5, 5), rows sum to 1
    step = [(a[i, 0, 0] + np.eye(5)) / 2 for i in range(2)]
    np.testing.assert_allclose(attention_rollout(a)[0], step[1] @ step[0], atol=1e-14)


def test_head_fusion_takes_the_mean_max_or_min_of_the_heads():
    a = np.stack([np.full((3, 3), 0.1), np.full((3, 3), 0.5)])[None]  # (B=1, H=2, 3, 3)
    assert fuse_heads(a, 'mean')[0, 0, 0] == pytest.approx(0.3)
    assert fuse_heads(a, 'max')[0, 0, 0] == 0.5 and fuse_heads(a, 'min')[0, 0, 0] == 0.1
    with pytest.raises(ValueError, match="head_fusion='median' is not one of"):
        fuse_heads(a, 'median')


def test_discard_zeroes_the_lowest_patch_weights_and_keeps_the_class_column():
    rng = np.random.default_rng(1)
    a = rng.dirichlet(np.ones(10), size=(2, 10))  # (B, N, N)
    a[:, :, 0] = 1e-6  # the class column is the lowest of all: still kept
    out = discard_lowest(a, 0.5, num_prefix_tokens=1)
    np.testing.assert_array_equal(out[:, :, 0], a[:, :, 0])
    for b in range(2):
        patches, dropped = out[b, :, 1:], a[b, :, 1:][out[b, :, 1:] == 0]
        assert (patches == 0).sum() == int(0.5 * 90) == 45
        assert dropped.max() <= a[b, :, 1:][patches > 0].min()  # the lowest ones went
    # Distilled DeiT: both prefix columns kept.
    np.testing.assert_array_equal(discard_lowest(a, 0.9, num_prefix_tokens=2)[:, :, :2], a[:, :, :2])
    # Through the rollout: rows renormalised after adding the identity.
    joint = attention_rollout(a[None, :, None], discard_ratio=0.5)
    np.testing.assert_allclose(joint.sum(axis=-1), 1.0, atol=1e-12)


def test_token_map_class_row_distilled_and_gap():
    joint = np.arange(2 * 6 * 6, dtype=float).reshape(2, 6, 6)
    np.testing.assert_array_equal(token_map(joint, 2, 2), joint[:, 0, 2:].reshape(2, 2, 2))  # DeiT: 2 prefix tokens
    joint = np.arange(2 * 4 * 4, dtype=float).reshape(2, 4, 4)
    np.testing.assert_array_equal(token_map(joint, 0, 2), joint.mean(axis=1).reshape(2, 2, 2))  # gap: no class token


# Mean attention distance ------------------------------------------------------------------------------------------
def _one_hot_attention(grid: int, target) -> np.ndarray:
    """(1, 1, 1 + g^2, 1 + g^2) attention of each patch query on the patch ``target(row, col)``; token 0 = class."""
    n = grid * grid
    a = np.zeros((1, 1, n + 1, n + 1))
    a[0, 0, 0, 0] = 1.0
    for q in range(n):
        r, c = divmod(q, grid)
        tr, tc = target(r, c)
        a[0, 0, 1 + q, 1 + tr * grid + tc] = 1.0
    return a


def test_attention_on_the_query_itself_is_at_distance_zero():
    assert mean_attention_distance(_one_hot_attention(14, lambda r, c: (r, c)), 14, 16.0)[0, 0] == 0.0


def test_attention_on_the_right_neighbour_is_one_patch_width():
    # The last column has no right-hand neighbour: it looks left, also one patch away.
    a = _one_hot_attention(14, lambda r, c: (r, c + 1 if c < 13 else c - 1))
    assert mean_attention_distance(a, 14, 16.0)[0, 0] == pytest.approx(16.0, abs=1e-12)
    # Diagonal neighbour: sqrt(2) patch widths.
    a = _one_hot_attention(4, lambda r, c: (r + 1 if r < 3 else r - 1, c + 1 if c < 3 else c - 1))
    assert mean_attention_distance(a, 4, 16.0)[0, 0] == pytest.approx(16.0 * np.sqrt(2), abs=1e-12)


def test_weight_on_the_class_token_is_not_renormalised_away():
    a = _one_hot_attention(14, lambda r, c: (r, c + 1 if c < 13 else c - 1)) / 2
    a[0, 0, 1:, 0] = 0.5  # half of every patch query's attention goes to the class token
    assert mean_attention_distance(a, 14, 16.0)[0, 0] == pytest.approx(8.0, abs=1e-12)


# Position embeddings ----------------------------------------------------------------------------------------------
def test_one_hot_row_and_column_embeddings_give_half_per_shared_coordinate():
    g = 5
    rows, cols = np.divmod(np.arange(g * g), g)
    table = np.concatenate([np.eye(g)[rows], np.eye(g)[cols]], axis=1)  # [onehot(row), onehot(col)]
    model = models.create_model('vit_ti16', num_classes=10, image_size=4 * g, patch_size=4, hidden_size=2 * g,
                                num_layers=1, num_heads=1, mlp_dim=8)
    pos_embed = np.concatenate([np.full((1, 2 * g), 7.0), table])[None]  # the class token's row is dropped
    patches, kind = patch_position_embeddings(model, {'pos_embed': pos_embed})
    assert kind == 'learned pos_embed'
    expected = ((rows[:, None] == rows[None, :]).astype(float) + (cols[:, None] == cols[None, :])) / 2
    np.testing.assert_allclose(cosine_similarity(patches), expected, atol=1e-14)


def test_fixed_tables_sincos2d_and_t2t_sinusoid():
    model = models.create_model('vit_ti16', num_classes=0, image_size=32, patch_size=8, posemb='sincos2d', **TINY)
    table, kind = patch_position_embeddings(model, {})  # not a parameter: recomputed
    assert table.shape == (16, 32) and 'sincos2d' in kind
    sim = cosine_similarity(table)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-12)
    assert sim[0, 1] > sim[0, 3]  # nearer patches are more alike
    t2t = models.create_model('t2t_vit_7', num_classes=0, image_size=32, token_dim=16, **TINY)
    table, kind = patch_position_embeddings(t2t, {'sinusoid_pos_embed': sinusoid_table(5, 32)})
    assert table.shape == (4, 32) and 'T2T' in kind


# Embedding filters ------------------------------------------------------------------------------------------------
def test_a_rank_one_kernel_has_one_component_with_all_the_variance():
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(4, 4, 3)), rng.normal(size=32)
    kernel = np.einsum('hwc,d->hwcd', u, v)
    components, explained = embedding_filters(kernel, num_components=5)
    assert components.shape == (5, 4, 4, 3)
    assert explained[0] == pytest.approx(1.0, abs=1e-12)
    assert abs(np.sum(components[0] * u) / np.linalg.norm(u)) == pytest.approx(1.0, abs=1e-12)  # it is u


def test_explained_variance_of_a_full_rank_kernel_sums_to_one():
    kernel = np.random.default_rng(3).normal(size=(2, 2, 3, 40))
    _, explained = embedding_filters(kernel, num_components=12)
    assert explained.sum() == pytest.approx(1.0, abs=1e-12) and np.all(np.diff(explained) <= 1e-15)


# The attention maps of the models ---------------------------------------------------------------------------------
def _tiny(name: str, seed: int = 0, **overrides):
    model = models.create_model(name, num_classes=10, image_size=32, **{**TINY, **overrides})
    # Random values without compiling init (slow on a busy CPU): shapes from eval_shape, N(0, 0.2^2) everywhere.
    shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def test_encoder_attention_rows_sum_to_one_and_scan_gives_the_same_maps():
    images = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
    model, params = _tiny('vit_ti16', patch_size=8)
    a = encoder_attention(model, params, images)
    assert a.shape == (2, 3, 2, 17, 17)
    np.testing.assert_allclose(a.sum(axis=-1), 1.0, atol=1e-5)
    scanned = models.create_model('vit_ti16', num_classes=10, image_size=32, patch_size=8, scan_layers=True, **TINY)
    from vit_jax.checkpoints import stack_layers
    np.testing.assert_allclose(encoder_attention(scanned, stack_layers(params), images), a, atol=1e-6)


FAMILIES = {
    'vit': ('vit_ti16', dict(patch_size=8), 1, True),
    'gap': ('vit_ti16', dict(patch_size=8, classifier='gap'), 0, True),
    'deit_distilled': ('deit_ti16_distilled', dict(patch_size=8), 2, True),
    't2t': ('t2t_vit_7', dict(token_dim=16), 1, False),
    'hybrid': ('r26_vit_s32', dict(resnet_layers=(1, 1), resnet_width=0.5, patch_size=1), 1, False),
}


@pytest.mark.parametrize('family', FAMILIES)
def test_analyze_every_family(family, tmp_path):
    from PIL import Image

    from vit_jax.analyze import analyze
    name, overrides, prefix, has_filters = FAMILIES[family]
    model, params = _tiny(name, **overrides)
    image = tmp_path / 'image.png'
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    loaded = Loaded(model, params, public_eval_augment(models.model_info(name).family), 32, None, 'none',
                    {'model': name})
    report = analyze(loaded, str(tmp_path / 'out'), [str(image), str(tmp_path / 'missing.jpg')], layer=1, head=1,
                     log=lambda m: None)
    assert report['num_prefix_tokens'] == prefix
    assert len(report['errors']) == 1 and 'missing.jpg' in report['errors'][0]
    g = model.grid_size
    assert np.asarray(report['attention_rollout']['maps']).shape == (1, g, g)
    assert np.asarray(report['mean_attention_distance']['pixels']).shape == (2, 2)
    assert np.asarray(report['position_embeddings']['similarity']).shape == (g * g, g * g)
    assert ('explained_variance_ratio' in report['embedding_filters']) == has_filters
    if not has_filters:
        assert 'no RGB filters' in report['embedding_filters']['skipped'] or 'no linear patch embedding' in \
            report['embedding_filters']['skipped']
    if prefix == 0:
        assert 'no class token' in report['attention_rollout']['token']
    written = json.loads((tmp_path / 'out' / 'analysis.json').read_text())
    assert set(written['figures'].values()) <= {p.name for p in (tmp_path / 'out').iterdir()}
    assert (tmp_path / 'out' / 'attention_layer1_head1.png').exists()


def test_a_resnet_is_refused_with_the_reason():
    from vit_jax.analyze import analyze
    model = models.create_model('resnet26', num_classes=10, resnet_layers=(1, 1), resnet_width=0.5)
    loaded = Loaded(model, {}, public_eval_augment('resnet'), 32, None, 'none', {})
    with pytest.raises(NotApplicableError, match='CNN: it has no attention'):
        analyze(loaded, '/nonexistent')


def test_cli_on_the_vision_transformer_fixture(tmp_path, capsys):
    from PIL import Image

    from vit_jax.analyze import main
    image = tmp_path / 'image.jpg'
    Image.fromarray(np.random.default_rng(6).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    args = ['--checkpoint', str(FIXTURES / 'vitjax_token_rep.npz'), '--model', 'vit_b16', '--image-size', '32',
            '--override', 'patch_size=4', '--override', 'hidden_size=48', '--override', 'num_layers=2',
            '--override', 'num_heads=3', '--override', 'mlp_dim=96', '--override', 'representation_size=32']
    assert main([*args, str(image), '--out', str(tmp_path / 'out'), '--head-fusion', 'max',
                 '--discard-ratio', '0.5']) == 0
    report = json.loads((tmp_path / 'out' / 'analysis.json').read_text())
    assert report['attention_rollout']['head_fusion'] == 'max'
    assert np.asarray(report['mean_attention_distance']['pixels']).shape == (2, 3)
    assert len(report['embedding_filters']['explained_variance_ratio']) == 28
    assert main([*args, '--out', str(tmp_path / 'out2'), '--layer', '5']) == 1  # no image: distance skipped too
    assert main([*args, str(image), '--out', str(tmp_path / 'out3'), '--layer', '5']) == 1
    assert 'the model has blocks 0..1 and heads 0..2' in capsys.readouterr().err


def test_batches_are_sized_to_the_memory_budget_and_padding_is_dropped():
    from vit_jax.analysis.attention import batch_size_for, batched_attention
    large = models.create_model('vit_l16', num_classes=1000, image_size=384)
    assert batch_size_for(large) == 1  # 24 x 16 x 577^2 floats: 0.5 GB an image
    assert batch_size_for(models.create_model('vit_b16', num_classes=1000)) == 24  # 512 MiB / 21.3 MiB
    model, params = _tiny('vit_ti16', patch_size=8)
    images = np.random.default_rng(7).normal(size=(5, 32, 32, 3)).astype(np.float32)
    parts = list(batched_attention(model, params, images, batch_size=2))
    assert [p[0].shape[1] for p in parts] == [2, 2, 1] and [p[1].shape for p in parts][-1] == (1, 10)
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts], axis=1), encoder_attention(model, params, images),
                               atol=1e-6)


def test_single_head_map_is_that_heads_class_token_row():
    from vit_jax.analyze import single_head_maps
    model = models.create_model('vit_ti16', num_classes=10, image_size=32, patch_size=16, **TINY)  # 2x2 patches
    a = np.random.default_rng(8).dirichlet(np.ones(5), size=(2, 3, 2, 5))  # (L, B, H, N, N)
    np.testing.assert_array_equal(single_head_maps(a, model, 1, 0), a[1, :, 0, 0, 1:].reshape(3, 2, 2))
