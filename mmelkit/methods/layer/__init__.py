"""Model-level, layer-granularity tools: where in a model a concept or an answer appears.

CLIP image towers (SPEC §7):

* :func:`layer_probes` / :func:`fit_ridge_probe`: linear probes per block for colour, shape,
  count and a spatial relation, on held-out scenes;
* :func:`clip_logit_lens`: zero-shot accuracy read through the final norm and projection after
  every block;
* :func:`layer_ablation`: zero-shot accuracy with a block's attention branch, MLP branch or both
  replaced by their mean over the images (the branch's total effect; :func:`branch_means` and
  :func:`mean_ablated` are its two steps).

Generative VLMs (SPEC §6): where in the decoder the image enters the answer.

* :func:`attention_knockout`: block the attention edges from the visual tokens (or one object's)
  to the answer's query column in a window of layers, and watch p(answer) drop;
* :func:`causal_trace`: corrupt the visual tokens, restore one clean (layer, position) hidden
  state at a time, and watch p(answer) recover;
* :func:`logit_lens`: read the visual tokens' hidden states through the final norm and LM head.
"""

from mmelkit.methods.layer.attention_knockout import KnockoutResult, attention_knockout, knocked_out
from mmelkit.methods.layer.causal_trace import CausalTrace, causal_trace
from mmelkit.methods.layer.clip_logit_lens import ClipLogitLens, clip_logit_lens
from mmelkit.methods.layer.layer_ablation import (
    BranchMeans,
    LayerAblation,
    branch_means,
    layer_ablation,
    mean_ablated,
)
from mmelkit.methods.layer.logit_lens import LogitLens, logit_lens
from mmelkit.methods.layer.probes import LinearProbe, ProbeResult, fit_ridge_probe, layer_probes, probe_layers

__all__ = ["BranchMeans", "CausalTrace", "ClipLogitLens", "KnockoutResult", "LayerAblation", "LinearProbe", "LogitLens",
           "ProbeResult", "attention_knockout", "branch_means", "causal_trace", "clip_logit_lens", "fit_ridge_probe",
           "knocked_out", "layer_ablation", "layer_probes", "logit_lens", "mean_ablated", "probe_layers"]
