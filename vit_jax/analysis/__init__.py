"""Looking inside a trained model (ViT paper section 4.5, figures 6 and 7; appendix D.7-D.8).

- ``rollout``: attention rollout (Abnar & Zuidema 2020) and single-head maps of the class token;
- ``distance``: mean attention distance per head and depth;
- ``posemb``: cosine similarity of the patches' position embeddings;
- ``filters``: the top principal components of the patch-embedding kernel;
- ``attention``: every encoder block's attention maps, read from the sown ``'attention_weights'``;
- ``loading``: a workdir or checkpoint with its eval transform and class names (shared with ``vit_jax.predict``);
- ``plotting``: the figures. ``python -m vit_jax.analyze`` writes them all.

Importing this package does not import TensorFlow or matplotlib.
"""

from vit_jax.analysis.attention import NotApplicableError, encoder_attention, pixels_per_token
from vit_jax.analysis.distance import mean_attention_distance, patch_distances
from vit_jax.analysis.filters import embedding_filters
from vit_jax.analysis.posemb import cosine_similarity, patch_position_embeddings
from vit_jax.analysis.rollout import attention_rollout, discard_lowest, fuse_heads, token_map

__all__ = ['NotApplicableError', 'attention_rollout', 'cosine_similarity', 'discard_lowest', 'embedding_filters',
           'encoder_attention', 'fuse_heads', 'mean_attention_distance', 'patch_distances',
           'patch_position_embeddings', 'pixels_per_token', 'token_map']
