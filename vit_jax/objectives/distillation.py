"""DeiT's distillation (Touvron et al. 2021, section 4): a student learns from a frozen teacher's logits.

    loss = (1 - alpha) * CE(class head, labels) + alpha * KD(distillation head, teacher)     # deit/losses.py

``soft``: KD = tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), summed and divided by batch x classes
(``numel``, DeiT's ``DistillationLoss``) or by the batch (``batchmean``, timm / big_vision). ``hard``: KD = CE of the
distillation head against the teacher's argmax, with no label smoothing. A student without a distillation token
distils through its one head (DeiT table 3's "class embedding" rows). The teacher sees the student's augmented and
mixed batch (deit/engine.py ``train_one_epoch``), converted to its own normalisation and resolution.

The teacher's parameters are the objective's frozen state: sharded over the mesh, no gradient, no optimizer state,
not saved in our checkpoints (read again from ``teacher.path`` on resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax.objectives.supervised import Objective, Supervised, classification_sums

TYPES = ('none', 'soft', 'hard')
KL_NORMALISATIONS = ('numel', 'batchmean')
FUSIONS = ('logit_mean', 'softmax_sum')
# DeiT section 5.2: soft, tau 3.0, lambda 0.1, and eq. 2's KL per image (its code divides by classes as well).
PRESETS = {'': {}, 'paper': dict(type='soft', tau=3.0, alpha=0.1, kl_normalisation='batchmean')}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def soft_distillation(student_logits: jax.Array, teacher_logits: jax.Array, tau: float,
                      normalisation: str = 'numel') -> jax.Array:
    """tau^2 KL(p_teacher(tau) || p_student(tau)) summed, / (batch x classes) (``numel``) or / batch (``batchmean``).

    deit/losses.py ``DistillationLoss.forward``: ``F.kl_div(log_softmax(s / T), log_softmax(t / T), reduction='sum',
    log_target=True) * (T * T) / outputs_kd.numel()``.
    """
    log_student = jax.nn.log_softmax(student_logits / tau, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student))
    denominator = student_logits.size if normalisation == 'numel' else student_logits.shape[0]
    return kl * tau * tau / denominator


def hard_distillation(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """CE of the student against the teacher's argmax (deit/losses.py: ``F.cross_entropy(outputs_kd, argmax)``)."""
    return optax.softmax_cross_entropy_with_integer_labels(student_logits, jnp.argmax(teacher_logits, -1)).mean()


def to_pixels(images: jax.Array, normalization: str) -> jax.Array:
    """Undoes ``vit_jax.data``'s normalisation: back to [0, 255]."""
    if normalization == 'inception':
        return (images + 1.0) * 127.5
    return (images * IMAGENET_STD + IMAGENET_MEAN) * 255.0


def from_pixels(pixels: jax.Array, normalization: str) -> jax.Array:
    if normalization == 'inception':
        return pixels / 127.5 - 1.0
    return (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """Where the teacher comes from and what its inputs look like."""

    model_name: str
    overrides: dict
    path: str
    format: str
    image_size: int
    normalization: str


@dataclasses.dataclass(frozen=True)
class Distillation(Objective):
    teacher: nn.Module = None
    spec: TeacherSpec = None
    num_classes: int = 0
    type: str = 'hard'
    alpha: float = 0.5
    tau: float = 1.0
    kl_normalisation: str = 'numel'
    fusion: str = 'logit_mean'
    image_size: int = 224
    normalization: str = 'inception'

    # Frozen state: the teacher's parameters ----------------------------------------------------------------------
    def frozen_shapes(self) -> Any:
        size = self.spec.image_size
        return jax.eval_shape(lambda: self.teacher.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))['params']

    def load_frozen(self) -> Any:
        """The teacher's weights (any format ``load_params`` reads), every missing or unexpected key listed."""
        from vit_jax import checkpoints
        from vit_jax.checkpoints.common import fit_to_model
        converted, unused, source = checkpoints.convert_checkpoint(self.spec.path, self.teacher, self.spec.format)
        head = converted.get('head/kernel')
        if head is not None and head.shape[-1] != self.num_classes:
            raise ValueError(
                f'config.distillation.teacher.path={self.spec.path!r} has {head.shape[-1]} classes but the dataset has '
                f'{self.num_classes}: the teacher must be trained (or fine-tuned) on the student\'s classes.')
        return fit_to_model(converted, self.teacher, source, unused)

    def teacher_input(self, images: jax.Array) -> jax.Array:
        """The student's (augmented, mixed) batch in the teacher's normalisation and resolution."""
        x = images
        if self.spec.normalization != self.normalization:
            x = from_pixels(to_pixels(x, self.normalization), self.spec.normalization)
        size = self.spec.image_size
        if size != x.shape[1]:
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), 'bicubic', antialias=True)
        return x

    def teacher_logits(self, frozen: Any, images: jax.Array) -> jax.Array:
        logits = self.teacher.apply({'params': jax.lax.stop_gradient(frozen)}, self.teacher_input(images), train=False)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    # Training ------------------------------------------------------------------------------------------------------
    def loss(self, params, objective_params, frozen, batch, rng):
        if self.type == 'none':
            return Supervised(self.model).loss(params, objective_params, frozen, batch, rng)
        outputs = self.model.apply({'params': params}, batch['images'], train=True, rngs={'dropout': rng})
        class_logits, distillation_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        teacher = self.teacher_logits(frozen, batch['images'])
        base = optax.softmax_cross_entropy(class_logits, batch['labels']).mean()
        if self.type == 'soft':
            kd = soft_distillation(distillation_logits, teacher, self.tau, self.kl_normalisation)
        else:
            kd = hard_distillation(distillation_logits, teacher)
        loss = (1.0 - self.alpha) * base + self.alpha * kd
        return loss, {'train_loss': loss, 'train_base_loss': base, 'train_distillation_loss': kd,
                      'train_accuracy': jnp.mean(jnp.argmax(class_logits, -1) == jnp.argmax(batch['labels'], -1)),
                      'train_agreement': jnp.mean(jnp.argmax(distillation_logits, -1) == jnp.argmax(teacher, -1))}

    # Eval: per head, their fusion, the teacher, and agreement ------------------------------------------------------
    def eval_sums(self, params, objective_params, frozen, batch):
        labels, mask = batch['labels'], batch['mask']
        outputs = self.model.apply({'params': params}, batch['images'], train=False,
                                   method=lambda m, x, train: m(x, train) if not getattr(m, 'distilled', False)
                                   else m.classify(m.encode(m.embed(x, train), train), train, both_heads=True))
        sums = {'count': jnp.sum(mask)}
        if isinstance(outputs, tuple):
            class_logits, distillation_logits = outputs
            if self.fusion == 'logit_mean':  # deit/models.py DistilledVisionTransformer at inference
                fused = (class_logits + distillation_logits) / 2
            else:  # the paper, section 5.1: "we add the softmax output by the two classifiers"
                fused = jnp.log((jax.nn.softmax(class_logits) + jax.nn.softmax(distillation_logits)) / 2)
            sums.update(classification_sums(class_logits, labels, mask, 'class_head_'))
            sums.update(classification_sums(distillation_logits, labels, mask, 'distillation_head_'))
        else:
            fused = outputs
        sums.update(classification_sums(fused, labels, mask))
        teacher = self.teacher_logits(frozen, batch['images'])
        sums.update(classification_sums(teacher, labels, mask, 'teacher_'))
        sums['agreement'] = jnp.sum((jnp.argmax(fused, -1) == jnp.argmax(teacher, -1)) * mask)
        return sums


def teacher_spec(config: ml_collections.ConfigDict) -> TeacherSpec:
    """The teacher's model and input from ``config.distillation.teacher``; a workdir supplies what is left unset."""
    t = config.distillation.teacher
    if not t.path:
        raise ValueError('config.objective="distillation" needs config.distillation.teacher.path: a checkpoint file '
                         '(with teacher.model_name) or a vit_jax workdir of the teacher.')
    if not os.path.exists(t.path):
        raise ValueError(f'config.distillation.teacher.path={t.path!r} does not exist.')
    from_workdir = {}
    config_json = os.path.join(t.path, 'config.json')
    if os.path.isfile(config_json):  # a vit_jax workdir knows its model, resolution and normalisation
        with open(config_json) as f:
            saved = json.load(f)
        from_workdir = dict(model_name=saved.get('model_name', ''),
                            overrides={k: v for k, v in (saved.get('model') or {}).items() if v is not None},
                            image_size=saved.get('image_size', 0),
                            normalization=(saved.get('augment') or {}).get('normalization', ''))
    overrides = {k: v for k, v in t.model.items() if v is not None}
    model_name = t.model_name or from_workdir.get('model_name', '')
    if not model_name:
        raise ValueError(f'config.distillation.teacher.model_name is empty and {t.path!r} is not a vit_jax workdir: '
                         'name the teacher\'s architecture (python -m vit_jax.models lists them).')
    return TeacherSpec(
        model_name=model_name, overrides={**from_workdir.get('overrides', {}), **overrides}, path=t.path,
        format=t.format, image_size=int(t.image_size or from_workdir.get('image_size') or config.image_size),
        normalization=t.normalization or from_workdir.get('normalization') or config.augment.normalization)


def create_distillation(config: ml_collections.ConfigDict, model: nn.Module, num_classes: int) -> Distillation:
    """The objective of ``config.distillation``, with every field checked before anything is built or compiled."""
    from vit_jax import models
    d = config.distillation
    if d.preset not in PRESETS:
        raise ValueError(f'config.distillation.preset={d.preset!r} is not one of {tuple(PRESETS)}.')
    fields = {**dict(type=d.type, alpha=float(d.alpha), tau=float(d.tau), kl_normalisation=d.kl_normalisation),
              **PRESETS[d.preset]}
    for name, allowed in [('type', TYPES), ('kl_normalisation', KL_NORMALISATIONS), ('fusion', FUSIONS)]:
        value = fields.get(name, d.get(name))
        if value not in allowed:
            raise ValueError(f'config.distillation.{name}={value!r} is not one of {allowed}.')
    if not 0.0 <= fields['alpha'] <= 1.0:
        raise ValueError(f'config.distillation.alpha={fields["alpha"]} must be in [0, 1] (the weight of the teacher).')
    if fields['tau'] <= 0:
        raise ValueError(f'config.distillation.tau={fields["tau"]} must be > 0 (the softmax temperature).')
    spec = teacher_spec(config)
    if spec.normalization not in ('inception', 'imagenet'):
        raise ValueError(f'config.distillation.teacher.normalization={spec.normalization!r} is not one of '
                         '(inception, imagenet).')
    try:
        teacher = models.create_model(spec.model_name, num_classes=num_classes, image_size=spec.image_size,
                                      platform=getattr(model, 'platform', None), **spec.overrides)  # beside the student
    except ValueError as e:
        raise ValueError(f'config.distillation.teacher: {e}') from e
    return Distillation(model=model, teacher=teacher, spec=spec, num_classes=num_classes,
                        fusion=d.fusion, image_size=config.image_size,
                        normalization=config.augment.normalization, **fields)
