"""DeiT-S with a distillation token, trained with hard distillation from a teacher (Touvron et al. 2021).

    python -m vit_jax.main --config configs/deit_s16_distilled.py --workdir workdirs/deit_s16_distilled \
        --config.distillation.teacher.path=TEACHER [--config.distillation.teacher.model_name=NAME]

TEACHER: a vit_jax workdir (its model, resolution and normalisation come from its config.json) or a checkpoint in any
format ``load_params`` reads, with its registry name. DeiT's teacher is RegNetY-16GF (82.9% top-1), which vit_jax
does not implement; any registry model trained on ImageNet-1k works (the paper's table 2: a convnet teacher gives a
better student than a transformer teacher).
Recipe: DeiT's (configs/deit_s16.py: facebookresearch/deit main.py defaults) plus its README's distillation
flags: --distillation-type hard, --distillation-alpha 0.5, --distillation-tau 1.0 (deit/main.py), the teacher
seeing the student's mixed batch (deit/engine.py).
Expected: 81.2% top-1 (DeiT paper table 3, DeiT-S⚗ with a RegNetY-16GF teacher, 300 epochs; 79.8% without
distillation); not reproduced here.
"""

from vit_jax.train.config import base_config, deit_recipe


def get_config():
    c = deit_recipe(base_config())
    c.model_name = 'deit_s16_distilled'
    c.objective = 'distillation'
    c.distillation.update(type='hard', alpha=0.5, tau=1.0)  # deit/README.md: --distillation-type hard
    # The teacher's resolution and normalisation: its workdir's, else the student's (224, ImageNet mean/std, as
    # timm's regnety_160); set distillation.teacher.image_size / .normalization for a checkpoint that differs.
    return c
