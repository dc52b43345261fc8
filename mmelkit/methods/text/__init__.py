"""Text-side methods: scores over the tokens and words of the text in each image-text pair."""

from mmelkit.methods.text.grad_eclip_text import GradECLIPText
from mmelkit.methods.text.integrated_gradients_text import IntegratedGradientsText
from mmelkit.methods.text.leave_one_word_out import LeaveOneWordOut

__all__ = ["GradECLIPText", "IntegratedGradientsText", "LeaveOneWordOut"]
