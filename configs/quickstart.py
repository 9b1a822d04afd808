"""Quickstart: a small ViT on the bundled digits (scikit-learn's 1,797 real 8x8 handwritten digits).

    python -m vit_jax.main --config configs/quickstart.py --workdir workdirs/quickstart

Dataset: ``sklearn_digits`` (prepared as a TFDS dataset in ~/tensorflow_datasets on first use; no download).
Expected: eval top-1 >= 0.97 on the 360 test digits, in under 5 minutes on a 2-core CPU (what ``make demo`` runs).
"""

from vit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model_name = 'vit_ti16'
    c.model.update(patch_size=4, hidden_size=96, num_layers=4, num_heads=3, mlp_dim=192, drop_path_rate=0.1)
    c.dataset = 'sklearn_digits'
    c.train_split, c.eval_split = 'train', 'test'
    c.image_size = 16
    c.batch_size = 128
    c.eval_batch_size = 360
    c.shuffle_buffer = 2_000
    c.augment.crop = 'inception'
    c.augment.crop_scale = (0.6, 1.0)
    c.augment.flip = False  # digits are not mirror-symmetric
    c.augment.crop_pct = 1.0
    c.augment.label_smoothing = 0.1
    c.optimizer.update(name='adamw', learning_rate=2e-3, weight_decay=0.05, warmup_steps=100, schedule='cosine',
                       grad_clip_norm=1.0)
    c.total_steps = 1500
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    return c
