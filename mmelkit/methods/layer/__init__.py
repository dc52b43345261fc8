"""Model-level, layer-granularity tools for generative VLMs (SPEC §6): where in the decoder the
image enters the answer.

* :func:`attention_knockout`: block the attention edges from the visual tokens (or one object's)
  to the answer's query column in a window of layers, and watch p(answer) drop;
* :func:`causal_trace`: corrupt the visual tokens, restore one clean (layer, position) hidden
  state at a time, and watch p(answer) recover;
* :func:`logit_lens`: read the visual tokens' hidden states through the final norm and LM head.
"""

from mmelkit.methods.layer.attention_knockout import KnockoutResult, attention_knockout, knocked_out
from mmelkit.methods.layer.causal_trace import CausalTrace, causal_trace
from mmelkit.methods.layer.logit_lens import LogitLens, logit_lens

__all__ = ["CausalTrace", "KnockoutResult", "LogitLens", "attention_knockout", "causal_trace", "knocked_out", "logit_lens"]
