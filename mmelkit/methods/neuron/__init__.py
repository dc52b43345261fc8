"""Model-level, neuron-granularity tools for CLIP image towers (SPEC §7).

* :func:`clip_dissect`: a concept label for every MLP neuron of a block (CLIP-Dissect: soft-WPMI or
  cos^3 between neuron activations and concept-image similarities);
* :func:`true_neuron_concepts` / :func:`label_match_rate`: on the scene world, the concept each
  neuron truly responds to (exact presence) and how often the labels name it, against random labels.
"""

from mmelkit.methods.neuron.clip_dissect import (
    MatchRate,
    NeuronLabels,
    clip_dissect,
    cos_cubed,
    label_match_rate,
    label_neurons,
    soft_wpmi,
    true_neuron_concepts,
)

__all__ = ["MatchRate", "NeuronLabels", "clip_dissect", "cos_cubed", "label_match_rate", "label_neurons", "soft_wpmi",
           "true_neuron_concepts"]
