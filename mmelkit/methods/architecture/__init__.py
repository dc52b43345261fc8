"""Model-level, architecture granularity: methods that read a different path through the network
(MaskCLIP's value path, CLIP Surgery's value-value path with feature surgery), and a model built to
be read: :func:`concept_bottleneck`, a label-free concept-bottleneck classifier over CLIP (sparse
linear layer on image-text concept cosines)."""

from mmelkit.methods.architecture.clip_surgery import CLIPSurgery
from mmelkit.methods.architecture.concept_bottleneck import (
    ConceptBottleneck,
    ConceptRationale,
    SparseLinearFit,
    concept_bottleneck,
    fit_sparse_linear,
)
from mmelkit.methods.architecture.maskclip import MaskCLIP

__all__ = ["CLIPSurgery", "ConceptBottleneck", "ConceptRationale", "MaskCLIP", "SparseLinearFit",
           "concept_bottleneck", "fit_sparse_linear"]
