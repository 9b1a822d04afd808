"""Fine-tune DeiT-B from 224 to 384 px with DeiT's recipe (Touvron et al. 2021, section 6 "fine-tuning at higher
resolution"; the released main.py has no fine-tuning code, ``# TODO: finetuning``, so the values beyond DeiT's
defaults come from the paper's text and are not checked against code).

    python -m vit_jax.main --config configs/finetune_deit_b16_384.py --workdir workdirs/deit_b16_384 \
        --config.init_from.path=/path/to/deit_base_patch16_224-b5f2ef4d.pth --config.data_dir=DATA_DIR

Dataset: ``imagenet2012`` prepared with TFDS. Weights: the DeiT release ``.pth`` (timm names under ``model``), or a
vit_jax workdir trained with configs/deit_b16.py; the 14x14 position grid is resized bicubically to 24x24.
Expected (the source's published number, DeiT paper table 7): 83.1% top-1 (DeiT-B at 384). Not reproduced here.
"""

from vit_jax.train.config import base_config, deit_recipe


def get_config():
    c = deit_recipe(base_config(), epochs=30, batch_size=512, warmup_epochs=0)  # section 6: 30 epochs
    c.model_name = 'deit_b16'
    c.init_from.update(path='', format='auto', posemb_resize='bicubic')  # section 6: bicubic interpolation
    c.image_size = 384
    c.augment.crop_pct = 1.0  # timm's deit_base_patch16_384 default_cfg: crop_pct 1.0
    c.optimizer.update(learning_rate=5e-6, weight_decay=1e-8, end_learning_rate=1e-6)  # section 6
    return c
