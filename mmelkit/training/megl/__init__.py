"""Training-level interpretability: explanation-guided learning (RRR, GRADIA, HAICS, MEGL).

* :mod:`.models` -- classifiers with a differentiable Grad-CAM, the rationale generator;
* :mod:`.losses` -- every loss as a function of tensors;
* :mod:`.data` -- the shortcut task as tensors, the rationale vocabulary, CLIP pseudo-masks;
* :mod:`.trainer` -- configurations, presets, resumable training;
* :mod:`.evaluate` -- accuracy, explanation and rationale quality; the configs x seeds study.
"""

from mmelkit.training.megl.data import (
    MeglSplit,
    RationaleVocab,
    attach_pseudo_masks,
    build_split,
    pseudo_masks,
)
from mmelkit.training.megl.evaluate import StudyResult, evaluate_megl, generate_rationales, megl_study
from mmelkit.training.megl.models import (
    ConvClassifier,
    RationaleGenerator,
    ViTClassifier,
    grad_cam,
    input_gradients,
)
from mmelkit.training.megl.trainer import PRESETS, MeglConfig, MeglModel, load_megl, preset, train_megl

__all__ = [
    "PRESETS",
    "ConvClassifier",
    "MeglConfig",
    "MeglModel",
    "MeglSplit",
    "RationaleGenerator",
    "RationaleVocab",
    "StudyResult",
    "ViTClassifier",
    "attach_pseudo_masks",
    "build_split",
    "evaluate_megl",
    "generate_rationales",
    "grad_cam",
    "input_gradients",
    "load_megl",
    "megl_study",
    "preset",
    "pseudo_masks",
    "train_megl",
]
