"""The training configuration: every field, with defaults. Recipes in ``configs/`` start from ``base_config()``.

Fields (override any of them on the command line: ``--config.optimizer.learning_rate=1e-3``):
- model: ``model_name`` (a registered name, see ``python -m vit_jax.models``) and ``model`` (overrides for
  ``create_model``: dropout_rate, drop_path_rate, dtype, scan_layers, remat, ...). ``image_size`` is shared with data.
- data: ``dataset``, ``data_dir``, ``train_split``, ``eval_split``, ``batch_size`` (global), ``eval_batch_size``,
  ``shuffle_buffer``, ``augment`` (see ``vit_jax.data``), ``skip_bad_images`` (folder datasets: skip and list files
  that do not decode instead of failing).
- optimisation: ``optimizer`` (see ``vit_jax.train.optim``), ``total_steps`` or ``num_epochs``.
- objective: ``objective`` ('supervised').
- fine-tuning: ``init_from`` (path, format, posemb_resize, skip).
- devices: ``mesh`` (data, fsdp, tensor sizes; -1 = the rest).
- bookkeeping: ``seed``, ``log_every``, ``eval_every``, ``checkpoint_every``, ``keep_checkpoints``, ``profile``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing

import ml_collections

from vit_jax.data import default_augment_config
from vit_jax.models import VisionTransformer

# Every create_model override but image_size (shared with the data: config.image_size) and platform (the mesh's
# devices decide it: vit_jax.hardware).
MODEL_OVERRIDE_FIELDS = [f.name for f in dataclasses.fields(VisionTransformer)
                         if f.init and f.name not in ('parent', 'name', 'num_classes', 'image_size', 'platform')]


def _override_type(hint) -> type:
    """The command-line type of a create_model field: ``int | None`` -> int, a dtype (``Any``) -> str."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] -> X (not tuple[int, ...] -> int)
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
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
    c.model_name = 'vit_b16'  # a registered model (python -m vit_jax.models)
    # Overrides for create_model; None = the registry's value for this model. Listed so that a locked config accepts
    # --config.model.drop_path_rate=0.1 and rejects a misspelt field.
    c.model = model_overrides_config()

    c.dataset = 'imagenet2012'
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.train_split = 'train'
    c.eval_split = 'validation'
    c.image_size = 224
    c.batch_size = 512  # global: all hosts and devices together
    c.eval_batch_size = 512  # global; the last batch is padded and masked
    c.shuffle_buffer = 50_000  # records per host
    # Folder datasets: a file that does not decode fails the run at dataset preparation, naming it; True skips such
    # files instead (counted and listed in the log).
    c.skip_bad_images = False
    c.augment = default_augment_config()

    c.objective = 'supervised'   # 'supervised' | 'distillation' (see vit_jax.objectives)
    # DeiT distillation (deit/main.py flags --teacher-model, --teacher-path, --distillation-type/alpha/tau).
    c.distillation = ml_collections.ConfigDict(dict(
        # The teacher: a vit_jax workdir (its model, resolution and normalisation are read from its config.json), or
        # a checkpoint in any format load_params reads with model_name (and model overrides) set.
        teacher=ml_collections.ConfigDict(dict(model_name='',    # its registered model (not for a workdir)
                                               path='',          # a vit_jax workdir or a checkpoint file
                                               format='auto',    # the checkpoint's format (load_params)
                                               image_size=0,        # 0: the workdir's, else the student's
                                               normalization='')),  # '': the workdir's, else the student's
        type='hard',                 # 'none' | 'soft' | 'hard' (DeiT's best; deit/main.py defaults to 'none')
        alpha=0.5,                   # deit/main.py --distillation-alpha
        tau=1.0,                     # deit/main.py --distillation-tau
        kl_normalisation='numel',    # soft: 'numel' (deit/losses.py: / batch x classes) | 'batchmean' (timm)
        fusion='logit_mean',         # eval of two heads: 'logit_mean' (DeiT's code) | 'softmax_sum' (DeiT's paper)
        preset='',                   # 'paper': soft, tau 3.0, alpha 0.1, KL per image (DeiT section 5.2, eq. 2)
    ))
    # Masked patch prediction (ViT appendix B.1.2): 50% of patches corrupted, 80% [mask] / 10% random / 10% kept.
    c.mpp = ml_collections.ConfigDict(dict(
        target='mean_colour',        # 'mean_colour' (512 classes) | 'downsampled' (4x4 x 512) | 'pixels' (L2)
        corruption_rate=0.5,         # fraction of patches corrupted
        mask_prob=0.8,               # of those: replaced by the [mask] embedding
        random_prob=0.1,             # of those: replaced by another patch (the rest kept)
        bits=3,                      # per channel: class = r * 64 + g * 8 + b of bins min(floor(v * 8), 7)
    ))
    # MAE (facebookresearch/mae main_pretrain.py / models_mae.py defaults for ViT-B).
    c.mae = ml_collections.ConfigDict(dict(
        mask_ratio=0.75,             # --mask_ratio
        decoder_width=512,           # mae_vit_base_patch16_dec512d8b
        decoder_depth=8,             # decoder blocks
        decoder_heads=16,            # decoder attention heads
        norm_pix_loss=True,          # --norm_pix_loss (the README's pretraining command sets it)
    ))
    # Linear few-shot eval on frozen pre-logits (big_vision evaluators/fewshot_lsr.py): every eval_every steps for
    # self-supervised objectives ('auto'), or 'on' / 'off'.
    c.fewshot = ml_collections.ConfigDict(dict(
        enabled='auto',              # 'auto' (self-supervised objectives) | 'on' | 'off'
        shots=(1, 5, 10, 25),        # examples per class
        l2_reg=2.0 ** 10,            # the ridge regression's L2 weight (big_vision's 2^10)
        seeds=3,                     # draws of the few examples, averaged
        train_split='',              # '': config.train_split (the examples drawn per class); tested on eval_split
    ))

    # Fine-tuning: start from pretrained weights (any format vit_jax.checkpoints reads, or a vit_jax workdir).
    # A new zero-initialised head when the class count differs, position embeddings resized ('bilinear' as
    # vision_transformer, 'bicubic' as DeiT / T2T), parameters matching the regex ``skip`` left at init.
    c.init_from = ml_collections.ConfigDict(dict(
        path='',                     # a checkpoint file or a vit_jax workdir; '' = from scratch
        format='auto',               # the checkpoint's format (vit_jax.checkpoints.load_params)
        posemb_resize='bilinear',    # 'bilinear' (vision_transformer) | 'bicubic' (DeiT, T2T)
        skip='',                     # a regex of parameter names left at their initialisation
    ))

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
        b1=0.9,                  # Adam's beta1
        b2=0.999,                # Adam's beta2
        eps=1e-8,                # Adam's epsilon
        mu_dtype='',             # Adam's first moment / SGD's momentum dtype ('bfloat16': big_vision,
                                 # vision_transformer's fine-tuning); '' = the params'
        momentum=0.9,            # sgd
        nesterov=False,          # sgd: Nesterov momentum
        weight_decay=0.0,        # on kernels only (vit_jax.train.optim.decays)
        weight_decay_mode='lr',  # 'lr': p -= lr(t) w p (AdamW, flax.optim.Adam) | 'schedule': p -= lr(t)/peak w p
                                 # (big_vision) | 'l2': g += w p (torch SGD)
        grad_clip_norm=0.0,      # global-norm clipping, 0 = off
        accumulation_steps=1,    # gradient accumulation: one update per this many steps (MultiSteps)
        microbatches=1,          # each step's batch computed in this many slices in turn: the same update,
                                 # ~1/microbatches of the activation memory (and on CPU, faster: in cache)
        ema_decay=0.0,           # EMA of parameters (T2T: 0.99996), 0 = off
        layer_decay=0.0,         # layer-wise lr decay (MAE / BEiT fine-tuning: 0.65 for ViT-B), 0 = off
    ))
    c.total_steps = 0            # > 0 wins over num_epochs
    c.num_epochs = 1.0           # of the train split, when total_steps is 0

    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,                     # replicas, each a slice of the batch (-1: the devices the others leave)
        fsdp=1,                      # also a slice of the batch, with parameters sharded along it (ZeRO-3)
        tensor=1,                    # attention heads and MLP units split (Megatron)
    ))

    c.seed = 0                   # initialisation, data order and augmentation, dropout
    c.log_every = 50             # steps between train metrics
    c.eval_every = 1000          # steps between evaluations (and one at the end)
    c.checkpoint_every = 1000    # steps between checkpoints (and one at the end)
    c.keep_checkpoints = 3       # the newest kept
    c.profile = False            # a TensorBoard profile of 5 steps
    # The teacher's architecture overrides: the same typed fields as config.model.
    c.distillation.teacher.model = copy.deepcopy(c.model)
    return c


IMAGENET_TRAIN_EXAMPLES = 1_281_167


def deit_recipe(c: ml_collections.ConfigDict, epochs: int = 300, batch_size: int = 1024,
                warmup_epochs: int = 5) -> ml_collections.ConfigDict:
    """DeiT's ImageNet-1k recipe: facebookresearch/deit ``main.py``'s defaults (on timm 0.3.2), without distillation.

    Each value names its main.py flag; tests/test_recipes.py locks them and ``python -m vit_jax.recipes`` lists
    what still differs from the source.
    """
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size  # DataLoader(drop_last=True); RASampler: N // 256 * 256
    c.dataset = 'imagenet2012'
    c.train_split, c.eval_split = 'train', 'validation'
    c.image_size = 224  # --input-size
    c.batch_size = batch_size  # paper table 9: 1024 (--batch-size 64 per GPU x 16)
    c.eval_batch_size = 1000
    c.augment.update(
        crop='inception', crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,  # timm create_transform
        interpolation='bicubic', antialias=True, jpeg_dct_method='INTEGER_ACCURATE',  # --train-interpolation; PIL
        randaugment_ops='timm_increasing', randaugment_num_layers=2, randaugment_magnitude=9,
        randaugment_magnitude_std=0.5,  # --aa rand-m9-mstd0.5-inc1
        random_erasing=0.25,  # --reprob 0.25 --remode pixel --recount 1
        mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,  # --mixup --cutmix ...
        label_smoothing=0.1,  # --smoothing
        repeated_augmentation=3,  # --repeated-aug (on by default): samplers.py RASampler, 3 copies
        normalization='imagenet',  # IMAGENET_DEFAULT_MEAN / STD
        eval_resize='timm', eval_interpolation='', crop_pct=0.875)  # datasets.py: Resize(int(256 / 224 * 224), 3)
    c.model.update(dropout_rate=0.0, drop_path_rate=0.1)  # --drop 0.0 --drop-path 0.1
    c.optimizer.update(
        name='adamw', learning_rate=5e-4 * batch_size / 512,  # --lr 5e-4, main.py: linear_scaled_lr
        b1=0.9, b2=0.999, eps=1e-8,  # torch AdamW's betas, --opt-eps 1e-8
        weight_decay=0.05, weight_decay_mode='lr',  # --weight-decay 0.05, torch.optim.AdamW: p *= 1 - lr * wd
        schedule='timm_cosine', warmup_steps=warmup_epochs * steps_per_epoch,  # --sched cosine --warmup-epochs 5
        warmup_init_learning_rate=1e-6, end_learning_rate=1e-5,  # --warmup-lr 1e-6 --min-lr 1e-5
        schedule_epoch_steps=steps_per_epoch, cosine_epochs=epochs,  # timm: t_initial=epochs, t_in_epochs
        schedule_epoch_lag=1,  # main.py: lr_scheduler.step(epoch) after epoch e sets the rate of epoch e + 1
        grad_clip_norm=0.0, mu_dtype='')  # --clip-grad None
    c.total_steps = epochs * steps_per_epoch  # --epochs 300 (main.py never runs the --cooldown-epochs)
    c.eval_every = steps_per_epoch * 5
    c.checkpoint_every = steps_per_epoch
    return c


BIG_VISION_I1K_TRAIN = 1_268_355  # train[:99%] of ImageNet-1k's 1,281,167 (TFDS rounds the 99 % boundary)


def big_vision_i1k_recipe(c: ml_collections.ConfigDict, epochs: int = 90) -> ml_collections.ConfigDict:
    """big_vision ``configs/vit_s16_i1k.py`` (Beyer et al. 2022, "Better plain ViT baselines"), value by value.

    The model's ``rep_size=True`` (a pre-logits layer of the model's width) is set by each config file.
    """
    c.dataset = 'imagenet2012'
    c.train_split, c.eval_split = 'train[:99%]', 'validation'  # config.train_split; config.evals.val
    c.image_size = 224
    c.batch_size = 1024  # config.batch_size
    c.eval_batch_size = 1000
    c.shuffle_buffer = 250_000  # config.shuffle_buffer_size
    c.augment.update(
        crop='inception', crop_scale=(0.05, 1.0), crop_ratio=(0.75, 1.33),  # decode_jpeg_and_inception_crop(224)
        flip=True, interpolation='bilinear', antialias=False, jpeg_dct_method='',  # |flip_lr; its resize defaults
        randaugment_ops='big_vision', randaugment_num_layers=2, randaugment_magnitude=10,
        randaugment_magnitude_std=0.0,  # |randaug(2,10)
        random_erasing=0.0, label_smoothing=0.0, repeated_augmentation=1,
        mixup_alpha=0.2, cutmix_alpha=0.0, mixup_prob=1.0,  # config.mixup = dict(p=0.2): Beta(0.2, 0.2) every batch
        normalization='inception',  # |value_range(-1, 1)
        eval_resize='big_vision', eval_interpolation='area', crop_pct=224 / 256)  # resize_small(256)|central_crop(224)
    c.model.update(classifier='gap', posemb='sincos2d', dropout_rate=0.0, drop_path_rate=0.0)  # config.model
    c.optimizer.update(
        name='adam', b1=0.9, b2=0.999, eps=1e-8, mu_dtype='bfloat16',  # optax_name='scale_by_adam', mu_dtype
        learning_rate=1e-3, weight_decay=1e-4, weight_decay_mode='schedule',  # config.lr, config.wd (optax.py::make)
        warmup_steps=10_000, schedule='cosine', end_learning_rate=0.0, warmup_init_learning_rate=0.0,
        grad_clip_norm=1.0)  # config.schedule = dict(warmup_steps=10_000, decay_type='cosine'); config.grad_clip_norm
    c.total_steps = round(epochs * BIG_VISION_I1K_TRAIN / c.batch_size)  # big_vision utils.steps: round(), 111,477
    c.eval_every = 2500  # config.evals log_steps
    c.checkpoint_every = 1000  # config.checkpoint_steps
    return c


def vit_pretrain_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ViT paper pretraining on ImageNet-21k (Dosovitskiy et al. 2021, section 4.1, table 3, appendix B.1).

    The paper's code (Flax's pre-optax ``flax.optim.Adam``) decays ``learning_rate * weight_decay * param`` per step:
    table 3's ImageNet-21k weight decay 0.03 (0.1 is the JFT rows') gives 1e-3 x 0.03 = 3e-5 of each kernel per
    step at the peak. The pre-logits layer (of the model's width) is set by each config file.
    """
    c.dataset = 'imagenet21k'
    c.train_split, c.eval_split = 'full[51200:]', 'full[:51200]'  # big_vision's held-out 50 x 1024 images
    c.image_size = 224
    c.batch_size = 4096  # table 3
    c.eval_batch_size = 4096
    c.shuffle_buffer = 250_000
    c.augment.update(
        crop='inception', crop_scale=(0.05, 1.0), crop_ratio=(0.75, 1.33), flip=True,  # vision_transformer
        interpolation='bilinear', antialias=False, jpeg_dct_method='',  # input_pipeline.py (train)
        randaugment_magnitude=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
        repeated_augmentation=1, normalization='inception',  # (im - 127.5) / 127.5
        eval_resize='square', eval_interpolation='', crop_pct=1.0)  # input_pipeline.py: resize to the crop size
    c.model.update(dropout_rate=0.1, drop_path_rate=0.0)  # table 3: dropout 0.1 (ImageNet-21k)
    c.optimizer.update(
        name='adam', b1=0.9, b2=0.999, eps=1e-8, mu_dtype='',  # section 4.1: Adam, beta1 0.9, beta2 0.999
        learning_rate=1e-3, weight_decay=0.03, weight_decay_mode='lr',  # table 3 (ImageNet-21k); flax.optim.Adam
        warmup_steps=10_000, schedule='linear', end_learning_rate=1e-5, warmup_init_learning_rate=0.0,  # B.1;
        grad_clip_norm=1.0)  # vision_transformer utils.create_learning_rate_schedule(linear_end=1e-5); B.1: clip 1
    c.num_epochs = 90  # table 3 / section 4.1: ImageNet-21k for 90 epochs
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
