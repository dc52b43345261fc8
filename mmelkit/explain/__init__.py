"""Explanation methods, organised by the survey's taxonomy (data, model, training, inference).

``mmelkit.explain.data``: data-level interpretability (counterfactual inputs, data attribution).
Model-level token methods (Grad-ECLIP, MMEL, rollout, ...) arrive in ``mmelkit.explain.token``.
"""
