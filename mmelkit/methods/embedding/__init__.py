"""Model-level, embedding-granularity tools for CLIP image towers (SPEC §7): what the image
embedding is made of and which directions in it mean what.

* :func:`decompose_image`: the embedding as a sum of direct contributions of every (layer, head,
  token), the MLPs and the embedding path (Gandelsman et al., ICLR 2024), exact to float error;
* :func:`head_ablation`: each head's direct contribution replaced by its dataset mean, and the
  zero-shot accuracy it costs;
* :func:`text_span_heads`: per head, the texts whose directions span most of its output (TextSpan);
* ``head_text_map`` (a map method for :func:`mmelkit.explain`): a text's per-patch score from the
  token terms of chosen heads;
* :func:`tcav`: concept activation vectors and TCAV scores with a t-test against random directions;
* :func:`train_sae`: a top-k sparse autoencoder, its features scored against exact concepts.
"""

from mmelkit.methods.embedding.head_ablation import HeadAblation, head_ablation, mean_ablate_heads
from mmelkit.methods.embedding.head_text_map import HeadTextMap
from mmelkit.methods.embedding.residual_decomposition import (
    ResidualDecomposition,
    decompose_image,
    linearised_head,
)
from mmelkit.methods.embedding.sparse_autoencoder import (
    DictionaryScores,
    SaeConfig,
    SaeResult,
    TopKSAE,
    sae_on_model,
    score_dictionary,
    train_sae,
)
from mmelkit.methods.embedding.tcav import (
    TcavResult,
    class_score_gradients,
    concept_direction,
    tcav,
    tcav_from_gradients,
    tcav_score,
)
from mmelkit.methods.embedding.text_span import (
    HeadTextSpans,
    TextSpanResult,
    scene_text_pool,
    text_span,
    text_span_heads,
)

__all__ = ["DictionaryScores", "SaeConfig", "SaeResult", "TopKSAE", "sae_on_model", "score_dictionary", "train_sae",
           "HeadAblation", "HeadTextMap", "HeadTextSpans", "ResidualDecomposition", "TcavResult", "TextSpanResult",
           "class_score_gradients", "concept_direction", "decompose_image", "head_ablation", "linearised_head",
           "mean_ablate_heads", "scene_text_pool", "tcav", "tcav_from_gradients", "tcav_score", "text_span",
           "text_span_heads"]
