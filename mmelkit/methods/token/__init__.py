"""Model-level, token-granularity methods: maps over image patches (CLIP models) or over the
visual tokens an answer of a generative VLM reads (the ``answer_*`` methods)."""

from mmelkit.methods.token.answer_attention import AnswerAttention
from mmelkit.methods.token.answer_gradient_x_input import AnswerGradientXInput
from mmelkit.methods.token.answer_integrated_gradients import AnswerIntegratedGradients
from mmelkit.methods.token.answer_relevancy import AnswerRelevancy
from mmelkit.methods.token.generic_attention import GenericAttention
from mmelkit.methods.token.grad_cam import GradCAM
from mmelkit.methods.token.grad_eclip import GradECLIP
from mmelkit.methods.token.integrated_gradients import IntegratedGradients
from mmelkit.methods.token.mmel import MMEL, LayerWeights, MMELSteps
from mmelkit.methods.token.raw_attention import RawAttention
from mmelkit.methods.token.rollout import AttentionRollout
from mmelkit.methods.token.smoothgrad import SmoothGrad

__all__ = ["MMEL", "AnswerAttention", "AnswerGradientXInput", "AnswerIntegratedGradients", "AnswerRelevancy", "AttentionRollout", "GenericAttention", "GradCAM", "GradECLIP", "IntegratedGradients", "LayerWeights", "MMELSteps", "RawAttention", "SmoothGrad"]
