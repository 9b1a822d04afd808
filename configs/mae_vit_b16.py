"""MAE pretraining of ViT-B/16 on ImageNet-1k (He et al. 2022; facebookresearch/mae main_pretrain.py, models_mae.py).

    python -m vit_jax.main --config configs/mae_vit_b16.py --workdir workdirs/mae_vit_b16

Objective: keep a random 25% of each image's patches, encode only those (with their own fixed 2-D sin-cos positions),
decode with mask tokens put back (width 512, 8 blocks, 16 heads) and regress the removed patches' pixels, normalised
per patch (``norm_pix_loss``). Labels are not used; the log reports the eval split's masked loss and linear few-shot
accuracies. Recipe (PRETRAIN.md): 800 epochs, batch 4096, lr = blr 1.5e-4 x 4096 / 256, AdamW (0.9, 0.95), weight
decay 0.05 (not on biases, norms, position embeddings, tokens), 40 warmup epochs then half-cycle cosine to 0 per
iteration (util/lr_sched.py), RandomResizedCrop(224, scale (0.2, 1), bicubic) + flip, ImageNet mean/std.
Differs from the source: the encoder's sin-cos frequencies are big_vision's (1/10000^(k / (D/4 - 1))) where MAE's are
1/10000^(k / (D/4)); the decoder's are MAE's. timm's Block init (xavier, trunc_normal tokens) is vision_transformer's.
Expected: 83.6% ImageNet top-1 after fine-tuning ViT-B (configs/finetune_from_mae.py; MAE table 3); not reproduced
here.
"""

from vit_jax.train.config import IMAGENET_TRAIN_EXAMPLES, base_config, deit_recipe


def get_config():
    epochs, batch, warmup_epochs = 800, 4096, 40  # main_pretrain.py --epochs 800 --warmup_epochs 40
    c = deit_recipe(base_config(), epochs=epochs, batch_size=batch, warmup_epochs=warmup_epochs)
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch
    c.model_name = 'deit_b16'  # timm's ViT-B: exact GELU, LayerNorm eps 1e-6, qkv bias
    c.model.update(posemb='sincos2d', drop_path_rate=0.0, dropout_rate=0.0)  # fixed sin-cos; no drop path
    c.objective = 'mae'
    c.mae.update(mask_ratio=0.75, decoder_width=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True)
    c.augment.update(
        crop='inception', crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,  # RandomResizedCrop
        interpolation='bicubic',  # interpolation=3
        randaugment_magnitude=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
        repeated_augmentation=1, normalization='imagenet')  # no other augmentation in main_pretrain.py
    c.optimizer.update(
        name='adamw', learning_rate=1.5e-4 * batch / 256, b1=0.9, b2=0.95,  # --blr 1.5e-4; betas (0.9, 0.95)
        weight_decay=0.05, weight_decay_mode='lr',  # --weight_decay 0.05 through torch AdamW
        schedule='cosine', warmup_steps=warmup_epochs * steps_per_epoch, warmup_init_learning_rate=0.0,
        end_learning_rate=0.0, grad_clip_norm=0.0)  # lr_sched.py: per-iteration warmup + half-cycle cosine
    c.fewshot.enabled = 'auto'
    return c
