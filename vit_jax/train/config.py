"""The training configuration: every field, with defaults. Recipes in ``configs/`` start from ``base_config()``.

Fields (override any of them on the command line: ``--config.optimizer.learning_rate=1e-3``):
- model: ``model_name`` (a registered name, see ``python -m vit_jax.models``) and ``model`` (overrides for
  ``create_model``: dropout_rate, drop_path_rate, dtype, scan_layers, remat, ...). ``image_size`` is shared with data.
- data: ``dataset``, ``data_dir``, ``train_split``, ``eval_split``, ``batch_size`` (global), ``eval_batch_size``,
  ``shuffle_buffer``, ``augment`` (see ``vit_jax.data``).
- optimisation: ``optimizer`` (see ``vit_jax.train.optim``), ``total_steps`` or ``num_epochs``.
- objective: ``objective`` ('supervised').
- fine-tuning: ``init_from`` (path, format, posemb_resize, skip).
- devices: ``mesh`` (data, fsdp, tensor sizes; -1 = the rest).
- bookkeeping: ``seed``, ``log_every``, ``eval_every``, ``checkpoint_every``, ``keep_checkpoints``, ``profile``.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import ml_collections

from vit_jax.data import default_augment_config
from vit_jax.models import VisionTransformer

# Every create_model override but image_size (shared with the data: config.image_size).
MODEL_OVERRIDE_FIELDS = [f.name for f in dataclasses.fields(VisionTransformer)
                         if f.init and f.name not in ('parent', 'name', 'num_classes', 'image_size')]


def _override_type(hint) -> type:
    """The command-line type of a create_model field: ``int | None`` -> int, a dtype (``Any``) -> str."""
    hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[X] -> X
    hint = typing.get_origin(hint) or hint  # tuple[int, ...] -> tuple
    return hint if hint in (int, float, bool, str, tuple) else str


def model_overrides_config() -> ml_collections.ConfigDict:
    """One typed placeholder per create_model override: None = the registry's value, and every field can still be set
    from the command line (ml_collections cannot override a plain None: ``--config.model.remat=True`` failed)."""
    hints = typing.get_type_hints(VisionTransformer)
    return ml_collections.ConfigDict({f: ml_collections.config_dict.placeholder(_override_type(hints[f]))
                                      for f in MODEL_OVERRIDE_FIELDS})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_name = 'vit_b16'
    # Overrides for create_model; None = the registry's value for this model. Listed so that a locked config accepts
    # --config.model.drop_path_rate=0.1 and rejects a misspelt field.
    c.model = model_overrides_config()

    c.dataset = 'imagenet2012'
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.train_split = 'train'
    c.eval_split = 'validation'
    c.image_size = 224
    c.batch_size = 512
    c.eval_batch_size = 512
    c.shuffle_buffer = 50_000
    c.augment = default_augment_config()

    c.objective = 'supervised'   # 'supervised' | 'distillation' (see vit_jax.objectives)
    # DeiT distillation (deit/main.py flags --teacher-model, --teacher-path, --distillation-type/alpha/tau).
    c.distillation = ml_collections.ConfigDict(dict(
        # The teacher: a vit_jax workdir (its model, resolution and normalisation are read from its config.json), or
        # a checkpoint in any format load_params reads with model_name (and model overrides) set.
        teacher=ml_collections.ConfigDict(dict(model_name='', path='', format='auto',
                                               image_size=0,        # 0: the workdir's, else the student's
                                               normalization='')),  # '': the workdir's, else the student's
        type='hard',                 # 'none' | 'soft' | 'hard' (DeiT's best; deit/main.py defaults to 'none')
        alpha=0.5,                   # deit/main.py --distillation-alpha
        tau=1.0,                     # deit/main.py --distillation-tau
        kl_normalisation='numel',    # soft: 'numel' (deit/losses.py: / batch x classes) | 'batchmean' (timm)
        fusion='logit_mean',         # eval of two heads: 'logit_mean' (DeiT's code) | 'softmax_sum' (DeiT's paper)
        preset='',                   # 'paper': soft, tau 3.0, alpha 0.1 (DeiT section 5.2)
    ))

    # Fine-tuning: start from pretrained weights (any format vit_jax.checkpoints reads, or a vit_jax workdir).
    # A new zero-initialised head when the class count differs, position embeddings resized ('bilinear' as
    # vision_transformer, 'bicubic' as DeiT / T2T), parameters matching the regex ``skip`` left at init.
    c.init_from = ml_collections.ConfigDict(dict(path='', format='auto', posemb_resize='bilinear', skip=''))

    c.optimizer = ml_collections.ConfigDict(dict(
        name='adamw',            # 'adamw' = 'adam' (how decay applies: weight_decay_mode) | 'sgd' (momentum)
        learning_rate=1e-3,      # peak, reached after warmup
        warmup_steps=0,          # in optimizer updates
        warmup_init_learning_rate=0.0,  # where warmup starts (timm's warmup_lr: 1e-6 in DeiT / T2T)
        schedule='cosine',       # 'cosine' | 'linear' | 'constant' (after warmup) | 'timm_cosine' (per epoch)
        end_learning_rate=0.0,   # cosine / linear decay target (timm's min_lr)
        schedule_epoch_steps=0,  # timm_cosine: updates per epoch (the schedule steps once per epoch)
        schedule_epoch_lag=0,    # timm_cosine: epoch e runs at epoch e - lag's rate (DeiT's main.py: 1)
        cosine_epochs=0,         # timm_cosine: timm's t_initial (epochs after it stay at end_learning_rate)
        b1=0.9, b2=0.999, eps=1e-8,
        mu_dtype='',             # Adam's first moment dtype ('bfloat16' in big_vision); '' = the params'
        momentum=0.9, nesterov=False,  # sgd
        weight_decay=0.0,        # on kernels only (vit_jax.train.optim.decays)
        weight_decay_mode='lr',  # 'lr': p -= lr(t) w p (AdamW, flax.optim.Adam) | 'schedule': p -= lr(t)/peak w p
                                 # (big_vision) | 'l2': g += w p (torch SGD)
        grad_clip_norm=0.0,      # global-norm clipping, 0 = off
        accumulation_steps=1,    # gradient accumulation: one update per this many steps (MultiSteps)
        microbatches=1,          # each step's batch computed in this many slices in turn: the same update,
                                 # ~1/microbatches of the activation memory (and on CPU, faster: in cache)
        ema_decay=0.0,           # EMA of parameters (T2T: 0.99996), 0 = off
    ))
    c.total_steps = 0            # > 0 wins over num_epochs
    c.num_epochs = 1.0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.seed = 0
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.profile = False
    # The teacher's architecture overrides: the same typed fields as config.model.
    c.distillation.teacher.model = copy.deepcopy(c.model)
    return c


IMAGENET_TRAIN_EXAMPLES = 1_281_167


def deit_recipe(c: ml_collections.ConfigDict, epochs: int = 300, batch_size: int = 1024,
                warmup_epochs: int = 5) -> ml_collections.ConfigDict:
    """DeiT's ImageNet-1k recipe (Touvron et al. 2021, table 9), without distillation; T2T-ViT reuses it.

    AdamW lr 5e-4 x batch / 512, wd 0.05 (not on biases, norms, position embeddings, tokens), warmup then cosine to
    1e-5, label smoothing 0.1, RandAugment (2, 9, mstd 0.5), mixup 0.8 / cutmix 1.0, random erasing 0.25, stochastic
    depth 0.1, no dropout, no clipping; ImageNet mean/std normalisation, bicubic resizes, eval crop 0.875.
    Not ported: repeated augmentation (x3).
    """
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
    c.dataset = 'imagenet2012'
    c.train_split, c.eval_split = 'train', 'validation'
    c.image_size = 224
    c.batch_size = batch_size
    c.eval_batch_size = 1000
    c.augment.update(crop='inception', crop_scale=(0.08, 1.0), flip=True, interpolation='bicubic',
                     randaugment_num_layers=2, randaugment_magnitude=9, randaugment_magnitude_std=0.5,
                     random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5,
                     label_smoothing=0.1, crop_pct=0.875, normalization='imagenet')
    c.model.update(dropout_rate=0.0, drop_path_rate=0.1)
    c.optimizer.update(name='adamw', learning_rate=5e-4 * batch_size / 512, weight_decay=0.05, b1=0.9, b2=0.999,
                       eps=1e-8, warmup_steps=warmup_epochs * steps_per_epoch, schedule='cosine',
                       end_learning_rate=1e-5, grad_clip_norm=0.0)
    c.total_steps = epochs * steps_per_epoch
    c.eval_every = steps_per_epoch * 5
    c.checkpoint_every = steps_per_epoch
    return c


def big_vision_i1k_recipe(c: ml_collections.ConfigDict, epochs: int = 90) -> ml_collections.ConfigDict:
    """big_vision's ImageNet-1k ViT baseline (``configs/vit_i1k.py``, Beyer et al. 2022 "Better plain ViT baselines").

    Batch 1024, Adam(W) lr 1e-3, decoupled wd 1e-4, 10k warmup then cosine, clip 1.0, inception crop, flip,
    RandAugment (2, 10), mixup 0.2; global average pooling, fixed sincos2d position embedding, no class token.
    """
    c.dataset = 'imagenet2012'
    c.train_split, c.eval_split = 'train[:99%]', 'train[99%:]'  # big_vision holds out 1% of train as minival
    c.image_size = 224
    c.batch_size = 1024
    c.eval_batch_size = 1000
    c.augment.update(crop='inception', crop_scale=(0.05, 1.0), flip=True, randaugment_num_layers=2,
                     randaugment_magnitude=10, randaugment_magnitude_std=0.0, mixup_alpha=0.2, cutmix_alpha=0.0,
                     crop_pct=0.875, normalization='inception')
    c.model.update(classifier='gap', posemb='sincos2d')
    c.optimizer.update(name='adamw', learning_rate=1e-3, weight_decay=1e-4, warmup_steps=10_000, schedule='cosine',
                       grad_clip_norm=1.0)
    c.total_steps = epochs * (IMAGENET_TRAIN_EXAMPLES * 99 // 100) // c.batch_size
    c.eval_every = 5000
    c.checkpoint_every = 2500
    return c


def vit_pretrain_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ViT paper pretraining on ImageNet-21k (section 4.1, table 3; B/16 and the R50 hybrid).

    Adam (b1 0.9, b2 0.999), lr 1e-3, weight decay 0.1, batch 4096, 10k warmup steps then linear decay, 90 epochs,
    dropout 0.1, global-norm clip 1.0, a pre-logits layer of the model width (dropped when fine-tuning), 224 px.
    """
    c.dataset = 'imagenet21k'
    c.train_split, c.eval_split = 'full[51200:]', 'full[:51200]'  # big_vision's held-out 50 x 1024 images
    c.image_size = 224
    c.batch_size = 4096
    c.eval_batch_size = 4096
    c.shuffle_buffer = 250_000
    c.augment.update(crop='inception', flip=True, crop_pct=0.875, normalization='inception')
    c.model.update(dropout_rate=0.1)
    c.optimizer.update(name='adam', learning_rate=1e-3, weight_decay=0.1, warmup_steps=10_000, schedule='linear',
                       end_learning_rate=1e-5, grad_clip_norm=1.0)
    c.num_epochs = 90
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    return c


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (``configs/NAME.py``, optionally ``:arg``), as ``--config`` loads it."""
    import importlib.util
    import os
    path, _, arg = path.partition(':')
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f'vit_jax_config_{name}', path)
    if spec is None or not os.path.exists(path):
        raise ValueError(f'No config file at {path}.')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
