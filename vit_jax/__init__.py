"""vit_jax: Vision Transformers in JAX/Flax, faithful to the papers, from one CPU to a pod."""

__version__ = '0.1.0'
