"""Data-level interpretability: how outputs move when the data moves, and which data they lean on."""

from mmelkit.methods.data.attribution import NearestPairs, TrainingBank, nearest_training_pairs
from mmelkit.methods.data.counterfactual import Counterfactual, counterfactual_captions, score_counterfactuals
from mmelkit.methods.data.tracin import TracIn, tracin

__all__ = ["Counterfactual", "NearestPairs", "TracIn", "TrainingBank", "counterfactual_captions", "nearest_training_pairs",
           "score_counterfactuals", "tracin"]
