"""python -m vit_jax.predict: the eval preprocessing of each family, class names, and errors that name the file."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax.core import meta
from PIL import Image

from vit_jax import models
from vit_jax.analysis import loading
from vit_jax.checkpoints import load_params
from vit_jax.predict import classify_files, main

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
# The fixture of google-research/vision_transformer as a registered model: 32 px, 10 classes.
OVERRIDES = dict(patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96, representation_size=32)
FIXTURE_ARGS = ['--checkpoint', str(FIXTURES / 'vitjax_token_rep.npz'), '--model', 'vit_b16', '--image-size', '32',
                *[a for k, v in OVERRIDES.items() for a in ('--override', f'{k}={v}')]]


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random picture (uint8), so that JPEG keeps it close and resizing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width] / max(height, width)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(2, 9) * y + rng.uniform(0, 6)) for _ in range(3)]
    return np.round(127.5 + 127 * np.stack(channels, axis=-1)).astype(np.uint8)


def _fixture_model():
    model = models.create_model('vit_b16', num_classes=10, image_size=32, **OVERRIDES)
    return model, load_params(FIXTURES / 'vitjax_token_rep.npz', model)


def test_jpeg_and_png_give_the_top1_of_the_model_applied_by_hand(tmp_path, capsys):
    jpeg, png, corrupt = tmp_path / 'a.jpg', tmp_path / 'b.png', tmp_path / 'corrupt.jpg'
    Image.fromarray(_picture(48, 64, 0)).save(jpeg, quality=95)
    Image.fromarray(_picture(40, 30, 1)).save(png)
    corrupt.write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
    assert main([*FIXTURE_ARGS, '--json', '--top', '3', str(jpeg), str(corrupt), str(png)]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)['results']
    assert [r['file'] for r in results] == [str(jpeg), str(corrupt), str(png)]
    assert 'corrupt.jpg: not a readable image' in results[1]['error'] and 'top' not in results[1]
    assert 'corrupt.jpg' in captured.err

    # By hand: vision_transformer's eval is a resize of the whole image to 32 x 32 (bilinear) and x / 127.5 - 1.
    model, params = _fixture_model()
    for path, result in [(jpeg, results[0]), (png, results[2])]:
        decoded = tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(decoded, tf.float32), (32, 32)).numpy() / 127.5 - 1.0
        probs = np.asarray(jax.nn.softmax(model.apply({'params': params}, image[None]))[0])
        assert result['top'][0]['class'] == int(probs.argmax())
        assert [t['probability'] for t in result['top']] == pytest.approx(np.sort(probs)[::-1][:3], abs=1e-5)
        assert result['top'][0]['name'] == str(int(probs.argmax()))  # a 10-class checkpoint has no names


def test_table_with_names_from_a_labels_file(tmp_path, capsys):
    image, labels = tmp_path / 'a.png', tmp_path / 'labels.txt'
    Image.fromarray(_picture(32, 32, 2)).save(image)
    labels.write_text('\n'.join(f'digit {i}' for i in range(10)) + '\n')
    assert main([*FIXTURE_ARGS, '--labels', str(labels), '--top', '2', str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and lines[1].split() == ['rank', 'class', 'name', 'probability']
    rank, cls, word, number, prob = lines[2].split()
    assert rank == '1' and word == 'digit' and number == cls and 0.0 < float(prob) <= 1.0
    (tmp_path / 'short.txt').write_text('a\nb\n')
    assert main([*FIXTURE_ARGS, '--labels', str(tmp_path / 'short.txt'), str(image)]) == 1
    assert 'has 2 names but the model has 10 classes' in capsys.readouterr().err


def test_deit_eval_is_resize_256_bicubic_center_crop_and_imagenet_statistics(tmp_path):
    path = tmp_path / 'tall.png'
    Image.fromarray(_picture(60, 40, 3)).save(path)
    augment = loading.public_eval_augment('deit')
    image = loading.load_image(str(path), augment, 32)
    # By hand, timm's Resize(int(32 / 0.875)) + CenterCrop(32) on a PIL image: shorter side 40 -> 36, so 60 x 40 ->
    # 54 x 36, bicubic with PIL's antialiasing, rounded to uint8; the crop at rows 11.., columns 2...
    resized = tf.image.resize(np.asarray(Image.open(path), np.float32), (54, 36), 'bicubic', antialias=True)
    crop = np.round(np.clip(resized.numpy(), 0, 255))[11:43, 2:34] / 255.0
    expected = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(image, expected, atol=1e-5)
    t2t = loading.public_eval_augment('t2t')
    assert (t2t.crop_pct, t2t.normalization, t2t.eval_interpolation, t2t.eval_resize) == (0.9, 'imagenet', 'bicubic',
                                                                                         'timm')
    vit = loading.public_eval_augment('hybrid', crop_pct=None)
    assert (vit.eval_resize, vit.normalization, vit.crop_pct) == ('square', 'inception', 1.0)


def test_imagenet_names_from_installed_packages(tmp_path):
    names, where = loading.imagenet_class_names(1000)
    assert (names[0], names[285], len(names)) == ('tench', 'Egyptian cat', 1000) and 'TFDS' in where
    # 21k from timm's data files (a stand-in directory here: timm is not a dependency).
    (tmp_path / 'imagenet21k_goog_synsets.txt').write_text('\n'.join(f'n{i:08d}' for i in range(21843)))
    (tmp_path / 'imagenet_synset_to_lemma.txt').write_text('n00000001\tentity, thing\n')
    names, _ = loading.imagenet_class_names(21843, timm_info_dir=str(tmp_path))
    assert len(names) == 21843 and names[1] == 'entity' and names[2] == 'n00000002'
    names, where = loading.imagenet_class_names(37)
    assert names is None and '--labels FILE' in where


def _digits_workdir(tmp_path: pathlib.Path):
    """A workdir as vit_jax.main writes it (config.json + orbax checkpoint) of a tiny random ViT on the digits."""
    import orbax.checkpoint as ocp
    from vit_jax.train.config import base_config
    tiny = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    config = base_config()
    config.model_name, config.dataset, config.data_dir = 'vit_ti16', 'sklearn_digits', str(tmp_path / 'tfds')
    config.model.update(patch_size=4, **tiny)
    config.train_split, config.eval_split = 'train', 'test'
    config.image_size, config.augment.eval_resize, config.augment.crop_pct = 16, 'square', 1.0
    workdir = tmp_path / 'workdir'
    workdir.mkdir()
    (workdir / 'config.json').write_text(config.to_json_best_effort())
    model = models.create_model('vit_ti16', num_classes=10, image_size=16, patch_size=4, **tiny)
    shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params'])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    with ocp.CheckpointManager(str(workdir / 'checkpoints')) as manager:
        manager.save(3, args=ocp.args.StandardSave({'step': np.int32(3), 'params': params}))
    return workdir, model, params


def test_a_workdir_uses_its_eval_transform_and_its_dataset_label_names(tmp_path):
    workdir, model, params = _digits_workdir(tmp_path)
    image = tmp_path / 'digit.png'
    Image.fromarray(_picture(8, 8, 4)).save(image)
    loaded = loading.from_workdir(str(workdir))
    assert loaded.class_names == [str(i) for i in range(10)] and 'sklearn_digits' in loaded.names_source
    [result] = classify_files(loaded, [str(image)], top=10)
    x = tf.image.resize(np.asarray(Image.open(image), np.float32), (16, 16)).numpy() / 127.5 - 1.0
    probs = np.asarray(jax.nn.softmax(model.apply({'params': params}, x[None]))[0])
    assert [t['class'] for t in result['top']] == list(np.argsort(-probs, kind='stable'))
    assert result['top'][0]['probability'] == pytest.approx(probs.max(), abs=1e-5)

    # analyze on the same workdir: without IMAGE files its rollout and distances take the run's eval split.
    from vit_jax.analyze import main as analyze_main
    out = tmp_path / 'analysis'
    assert analyze_main(['--workdir', str(workdir), '--out', str(out), '--num-images', '20',
                         '--rollout-images', '3']) == 0
    report = json.loads((out / 'analysis.json').read_text())
    assert report['mean_attention_distance']['images'] == 20
    assert report['mean_attention_distance']['images_from'] == 'sklearn_digits:test'
    assert len(report['attention_rollout']['maps']) == 3 and report['attention_rollout']['images'][0].startswith('#0')


def test_models_without_one_class_vector_per_image_are_refused(tmp_path):
    image = tmp_path / 'a.png'
    Image.fromarray(_picture(8, 8, 5)).save(image)
    for overrides, message in [(dict(num_classes=0), 'no classification head'),
                               (dict(num_classes=10, classifier='unpooled'), 'one output per token')]:
        model = models.create_model('vit_ti16', image_size=16, patch_size=4, hidden_size=32, num_layers=1,
                                    num_heads=2, mlp_dim=64, **overrides)
        loaded = loading.Loaded(model, {}, loading.public_eval_augment('vit'), 16, None, '', {})
        with pytest.raises(ValueError, match=message):
            classify_files(loaded, [str(image)])


def test_a_checkpoint_without_model_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(['--checkpoint', str(FIXTURES / 'vitjax_token_rep.npz'), 'x.png'])
    assert '--checkpoint needs --model NAME' in capsys.readouterr().err
