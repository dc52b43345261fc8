"""CLIP-Dissect: a text label for every neuron of a layer, and a check of those labels on the scene world.

Oikarinen & Weng, "CLIP-Dissect: Automatic Description of Neuron Representations in Deep Vision
Networks", ICLR 2023. For a layer with K neurons, a probe set of N images and C concept texts:

1. an activation matrix A (N, K): each neuron's (spatially pooled) activation on each image;
2. a concept-image similarity matrix S (N, C) from a CLIP model's image and text embeddings;
3. for each neuron, the concept whose similarity profile over the images best matches the neuron's
   activation profile, under a similarity function of the two columns: soft-WPMI (the paper's
   best) or cos^3 (its simpler successor in the authors' later code).

Here the model that is dissected is itself a CLIP, so it provides S from its own embeddings
(:func:`clip_dissect`); the tensor-level functions take any A and S.

On real photos nobody knows what a neuron "truly" responds to; on the scene world the concepts each
image holds are exact (:mod:`mmelkit.datasets.concepts`), so :func:`true_neuron_concepts` names the
concept whose presence best separates a neuron's activations (AUROC) and :func:`label_match_rate`
scores the labels against it, with a bootstrap CI and a random-label baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mmelkit._checks import did_you_mean, positive_int
from mmelkit.methods.base import register_tool
from mmelkit.models.adapter import ClipAdapter

__all__ = [
    "MatchRate",
    "NeuronLabels",
    "clip_dissect",
    "cos_cubed",
    "label_match_rate",
    "label_neurons",
    "soft_wpmi",
    "true_neuron_concepts",
]

LabelMethod = Literal["soft_wpmi", "cos3"]
LABEL_METHODS: tuple[str, ...] = ("soft_wpmi", "cos3")
# The reference implementation's defaults: the 100 most activating images, p(image in the neuron's
# set) falling linearly from 0.998 to 0.97 over them, softmax sharpness 10 (temperature 0.1), lambda 1.
DEFAULT_TOP_K = 100
DEFAULT_LAMBDA = 1.0
DEFAULT_TEMPERATURE = 0.1
# Above this AUROC a neuron counts as clearly responding to its best concept (see true_neuron_concepts).
DEFAULT_MIN_AUROC = 0.75


# --------------------------------------------------------------------------------------------------
# Similarity functions between activation columns and concept columns
# --------------------------------------------------------------------------------------------------


def _check_pair(activations: torch.Tensor, similarity: torch.Tensor) -> None:
    if activations.ndim != 2 or similarity.ndim != 2 or activations.shape[0] != similarity.shape[0]:
        raise ValueError(f"activations must be (N, K) and similarity (N, C) over the same N images; got "
                         f"{tuple(activations.shape)} and {tuple(similarity.shape)}")
    if activations.shape[0] == 0:
        raise ValueError("no probe images: activations and similarity have N = 0 rows")
    if activations.shape[1] == 0:
        raise ValueError("no neurons: activations have K = 0 columns")
    if similarity.shape[1] == 0:
        raise ValueError("empty concept pool: similarity has C = 0 columns")
    for name, value in (("activations", activations), ("similarity", similarity)):
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} hold non-finite values")


def soft_wpmi(
    activations: torch.Tensor,
    similarity: torch.Tensor,
    *,
    top_k: int = DEFAULT_TOP_K,
    lam: float = DEFAULT_LAMBDA,
    temperature: float = DEFAULT_TEMPERATURE,
    p_start: float = 0.998,
    p_end: float = 0.97,
) -> torch.Tensor:
    """Soft weighted pointwise mutual information between neurons and concepts: (N, K), (N, C) -> (K, C).

    CLIP-Dissect's soft-WPMI, in this formulation:

    * each image's distribution over concepts: P(c | x) = softmax_c(S[x, c] / ``temperature``);
    * neuron k's concept set is soft: its r-th most activating image (r = 0 .. top_k - 1) belongs to
      it with probability p_r, falling linearly from ``p_start`` to ``p_end``; images below the
      top k not at all;
    * log p(c | k) = sum_r log(p_r P(c | x_r) + 1 - p_r): the log-probability that every image of
      the soft set "is described by" c (an image outside the set contributes 1);
    * log p(c) = log mean_k p(c | k), over the K neurons given (the layer): how generic c is;
    * score(k, c) = log p(c | k) - ``lam`` log p(c).

    The lam term penalises concepts that describe every neuron's images alike. It is computed over
    the neurons passed in, so a neuron's scores depend on its layer mates (not on its label when
    lam is 0, and not at all with a single neuron, where it only rescales). ``top_k`` must not
    exceed N. Float64, on the inputs' device; memory is bounded by chunking over neurons.
    """
    _check_pair(activations, similarity)
    count = activations.shape[0]
    top_k = positive_int("top_k", top_k)
    if top_k > count:
        raise ValueError(f"top_k={top_k} exceeds the {count} probe images")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not 0.0 <= p_end <= p_start <= 1.0:
        raise ValueError(f"need 0 <= p_end <= p_start <= 1; got p_start={p_start}, p_end={p_end}")
    device = activations.device
    concept_given_image = torch.softmax(similarity.to(device, torch.float64) / temperature, dim=1)  # (N, C)
    top_images = activations.detach().topk(top_k, dim=0).indices  # (top_k, K)
    in_set = (p_start - torch.arange(top_k, device=device, dtype=torch.float64) / top_k * (p_start - p_end))
    in_set = in_set[:, None, None]  # (top_k, 1, 1)
    tiny = 1e-7  # keeps log finite where P(c|x) underflows and p_r = 1
    neurons, concepts = top_images.shape[1], similarity.shape[1]
    chunk = max(1, (1 << 24) // max(1, top_k * concepts))  # bound the (top_k, chunk, C) gather
    parts = []
    for start in range(0, neurons, chunk):
        gathered = concept_given_image[top_images[:, start : start + chunk]]  # (top_k, chunk, C)
        parts.append(torch.log(in_set * gathered + (1 - in_set) + tiny).sum(dim=0))
    log_concept_given_neuron = torch.cat(parts)  # (K, C)
    log_concept = torch.logsumexp(log_concept_given_neuron, dim=0, keepdim=True) - math.log(neurons)
    return log_concept_given_neuron - lam * log_concept


def cos_cubed(activations: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """cos^3 similarity: (N, K), (N, C) -> (K, C) in [-1, 1].

    Centre every column over the images, raise it to the third power (which keeps signs and
    stresses the images far from the mean: the strongly activating / clearly matching ones), then
    take the cosine between each neuron's and each concept's column. A constant column has no
    direction and scores 0 against everything. Float64, on the inputs' device.
    """
    _check_pair(activations, similarity)
    device = activations.device

    def cubed_unit_columns(matrix: torch.Tensor) -> torch.Tensor:
        centred = matrix.to(device, torch.float64)
        centred = centred - centred.mean(dim=0, keepdim=True)
        return F.normalize(centred.pow(3), dim=0, eps=1e-300)

    return cubed_unit_columns(activations.detach()).T @ cubed_unit_columns(similarity.detach())


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class NeuronLabels:
    """One concept label per neuron.

    ``labels`` (K,) the chosen concept texts; ``label_index`` (K,) long, their index in ``concepts``;
    ``scores`` (K, C) the similarity function's value of every neuron-concept pair (higher = better
    match; soft-WPMI in nats, cos^3 in [-1, 1]); ``method`` ``"soft_wpmi"`` or ``"cos3"``;
    ``concepts`` (C,) the concept pool; ``layer`` the dissected block, where known; ``params`` how
    the scores were made.
    """

    labels: list[str]
    label_index: torch.Tensor
    scores: torch.Tensor
    method: str
    concepts: list[str]
    layer: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per neuron: neuron, label, score, the runner-up concept and
        the margin between the two scores (a small margin is a weak label)."""
        import pandas as pd

        scores = self.scores.detach().double().cpu()
        concepts = len(self.concepts)
        best = scores.topk(min(2, concepts), dim=1)
        rows = []
        for neuron, label in enumerate(self.labels):
            row: dict[str, Any] = {"neuron": neuron, "label": label, "score": float(best.values[neuron, 0])}
            if concepts > 1:
                row["runner_up"] = self.concepts[int(best.indices[neuron, 1])]
                row["margin"] = float(best.values[neuron, 0] - best.values[neuron, 1])
            if self.layer is not None:
                row["layer"] = self.layer
            rows.append(row)
        return pd.DataFrame(rows)


def label_neurons(
    activations: torch.Tensor,
    similarity: torch.Tensor,
    concept_names: Sequence[str],
    method: LabelMethod = "soft_wpmi",
    *,
    top_k: int | None = None,
    lam: float = DEFAULT_LAMBDA,
    temperature: float = DEFAULT_TEMPERATURE,
) -> NeuronLabels:
    """Label each of K neurons with the best-matching of C concepts.

    ``activations`` (N, K) over N probe images; ``similarity`` (N, C) concept-image similarity
    (cosines of CLIP embeddings); ``concept_names`` (C,) one name per similarity column.
    ``method``: ``"soft_wpmi"`` (:func:`soft_wpmi`, with ``top_k`` (default min(100, N)), ``lam``
    and ``temperature``) or ``"cos3"`` (:func:`cos_cubed`, which takes no parameters). A tie
    between concepts goes to the one listed first.
    """
    concept_names = list(concept_names)
    if not concept_names:
        raise ValueError("empty concept pool: pass at least one concept")
    if similarity.ndim == 2 and similarity.shape[1] != len(concept_names):
        raise ValueError(f"similarity has {similarity.shape[1]} concept columns but {len(concept_names)} concept "
                         "names were given")
    if method == "soft_wpmi":
        top_k = min(DEFAULT_TOP_K, activations.shape[0]) if top_k is None else top_k
        scores = soft_wpmi(activations, similarity, top_k=top_k, lam=lam, temperature=temperature)
        params: dict[str, Any] = {"top_k": top_k, "lam": lam, "temperature": temperature}
    elif method == "cos3":
        scores = cos_cubed(activations, similarity)
        params = {}
    else:
        raise ValueError(f"unknown labelling method {method!r};{did_you_mean(method, LABEL_METHODS)} methods: "
                         f"{', '.join(LABEL_METHODS)}")
    index = scores.argmax(dim=1)  # torch.argmax returns the first maximum: ties go to the earlier concept
    labels = [concept_names[i] for i in index.tolist()]
    return NeuronLabels(labels, index, scores, method, concept_names, params=params)


@register_tool("clip_dissect", level="model", granularity="neuron", family="concept labelling",
               reference="Oikarinen & Weng, ICLR 2023 (CLIP-Dissect); SPEC §7")
def clip_dissect(
    model: ClipAdapter,
    images: torch.Tensor | Sequence[Any],
    layer: int,
    concepts: Sequence[str] | None = None,
    *,
    method: LabelMethod = "soft_wpmi",
    batch_size: int = 64,
    progress: bool = True,
    top_k: int | None = None,
    lam: float = DEFAULT_LAMBDA,
    temperature: float = DEFAULT_TEMPERATURE,
) -> NeuronLabels:
    """Label every MLP neuron of image block ``layer`` of a CLIP model with one of ``concepts``.

    Activations: the block's MLP hidden units after the nonlinearity, averaged over the patch tokens
    (``collect_activations(..., sites="neurons")``), over the probe ``images`` (model input or a
    list of images). Concept-image similarity: cosine of the model's own image embedding of each
    probe image with its text embedding of each concept. ``concepts`` default to the scene world's
    concept texts (:func:`mmelkit.datasets.concepts.concept_texts`); an empty list is an error, a
    ``layer`` outside the tower an IndexError. Returns :class:`NeuronLabels` with ``layer`` set.
    """
    from mmelkit.datasets.concepts import concept_texts
    from mmelkit.models.activations import collect_activations
    from mmelkit.models.tracing import resolve_blocks

    if concepts is None:
        concepts = concept_texts()
    concepts = list(concepts)
    if not concepts:
        raise ValueError("empty concept pool: pass at least one concept text (or None for the scene world's)")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int block index; got {layer!r}")
    (block,) = resolve_blocks(layer, model.num_image_blocks, "image")  # IndexError outside the tower
    acts = collect_activations(model, images, sites=("neurons", "embedding"), layers=block,
                               batch_size=batch_size, progress=progress)
    neurons = acts["neurons", block].to(model.device)
    with torch.no_grad():
        text = model.encode_text(concepts)
    similarity = F.normalize(acts["embedding"].to(model.device).float(), dim=-1) @ text.float().T
    labels = label_neurons(neurons, similarity, concepts, method, top_k=top_k, lam=lam, temperature=temperature)
    labels.layer = block
    return labels


# --------------------------------------------------------------------------------------------------
# Ground truth on the scene world
# --------------------------------------------------------------------------------------------------


def true_neuron_concepts(
    activations: torch.Tensor, presence: torch.Tensor, *, min_auroc: float = DEFAULT_MIN_AUROC
) -> torch.Tensor:
    """The concept each neuron truly responds to: (N, K) activations, (N, C) bool presence -> (K,) long.

    For every neuron the AUROC of its activation as a detector of each concept's exact presence
    (:func:`mmelkit.metrics.concepts.auroc`); its concept is the one with the highest AUROC,
    i.e. the concept whose presence best separates high from low activations. "Responds to" means
    fires MORE when the concept is there (CLIP-Dissect labels from the top-activating images), so a
    neuron suppressed by a concept (AUROC near 0) does not count as responding to it.

    Degenerate cases: a concept held by all or none of the images has no AUROC and is never chosen;
    a neuron whose best AUROC is below ``min_auroc`` (default 0.75), including a constant neuron
    (0.5 everywhere), responds to no concept clearly and gets -1; ties between concepts go to the
    one listed first.
    """
    # Imported here: mmelkit.metrics imports mmelkit.methods, so a module-level import would make
    # a cycle once mmelkit.methods imports this module.
    from mmelkit.metrics.concepts import auroc

    if not 0.5 <= min_auroc <= 1.0:
        raise ValueError(f"min_auroc must lie in [0.5, 1]; got {min_auroc}")
    if presence.ndim == 2 and presence.shape[1] == 0:
        raise ValueError("empty concept pool: presence has C = 0 columns")
    table = auroc(activations, presence)  # (K, C), NaN for degenerate concepts
    if torch.isnan(table).all():
        raise ValueError("no concept is present in some but not all probe images; the truth is undefined")
    best_value, best_index = table.nan_to_num(nan=-1.0).max(dim=1)  # max returns the first maximum
    return torch.where(best_value >= min_auroc, best_index, torch.full_like(best_index, -1))


@dataclass(eq=False)
class MatchRate:
    """How often neuron labels name the concept the neuron truly responds to.

    ``rate`` the share of kept neurons whose label is their true concept, ``ci`` its bootstrap
    interval over neurons; ``kept`` of ``total`` neurons had a clear true concept. Random labels:
    ``baseline`` the expected rate when the same labels are shuffled among the kept neurons, with
    ``baseline_ci`` the central interval of that permutation distribution and ``p_value`` the
    share of permutations reaching ``rate`` (one-sided, add-one); ``uniform_baseline`` 1 / C for
    labels drawn uniformly from the C concepts, ``uniform_ci`` its binomial interval at ``kept``
    neurons. ``matched`` (K,) bool per neuron (False for neurons not kept), ``kept_mask`` (K,).
    """

    rate: float
    ci: tuple[float, float]
    kept: int
    total: int
    baseline: float
    baseline_ci: tuple[float, float]
    p_value: float
    uniform_baseline: float
    uniform_ci: tuple[float, float]
    matched: torch.Tensor
    kept_mask: torch.Tensor
    confidence: float = 0.95
    method: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The scalar fields, for a table or a JSON report."""
        return {"method": self.method, "rate": self.rate, "ci_low": self.ci[0], "ci_high": self.ci[1],
                "kept": self.kept, "total": self.total, "baseline": self.baseline,
                "baseline_ci_low": self.baseline_ci[0], "baseline_ci_high": self.baseline_ci[1],
                "p_value": self.p_value, "uniform_baseline": self.uniform_baseline,
                "uniform_ci_low": self.uniform_ci[0], "uniform_ci_high": self.uniform_ci[1],
                "confidence": self.confidence}

    def to_frame(self) -> Any:
        """A one-row pandas DataFrame of :meth:`as_dict`."""
        import pandas as pd

        return pd.DataFrame([self.as_dict()])


def label_match_rate(
    labels: NeuronLabels,
    truth_index: torch.Tensor,
    truth_concepts: Sequence[str] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> MatchRate:
    """Share of neurons whose label is the concept they truly respond to, with a CI and random baselines.

    ``truth_index`` (K,) long from :func:`true_neuron_concepts`: -1 for neurons without a clear
    concept, which are left out (``kept`` says how many remain). It indexes ``truth_concepts``
    (default: the label pool ``labels.concepts``, i.e. the presence columns are the concepts in the
    same order); otherwise labels are matched to ``truth_concepts`` by string, and a label outside
    them never matches.

    Uncertainty: a percentile bootstrap over the kept neurons (``resamples`` draws). Random
    baselines, both reported: (1) permutation, the labels the method gave shuffled among the kept
    neurons (keeps how often each concept is used as a label, so a method that names one common
    concept for everything gets no credit beyond chance); its mean, central interval and the
    one-sided p-value of the observed rate; (2) uniform, each neuron labelled by a concept drawn
    uniformly from the C concepts of the pool: expected rate 1 / C, binomial interval at ``kept``.
    """
    import scipy.stats

    total = len(labels)
    truth = torch.as_tensor(truth_index).long().flatten().cpu()
    if truth.shape[0] != total:
        raise ValueError(f"truth_index has {truth.shape[0]} entries but there are {total} labelled neurons")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    resamples = positive_int("resamples", resamples)
    if truth_concepts is None:
        label_in_truth = labels.label_index.long().cpu()
        pool = len(labels.concepts)
    else:
        truth_concepts = list(truth_concepts)
        if not truth_concepts:
            raise ValueError("empty truth concept list")
        where = {name: i for i, name in enumerate(truth_concepts)}
        label_in_truth = torch.tensor([where.get(label, -2) for label in labels.labels], dtype=torch.long)
        pool = len(labels.concepts)
    if truth.max() >= (len(truth_concepts) if truth_concepts is not None else pool) or truth.min() < -1:
        raise ValueError("truth_index points past the concept list")
    kept_mask = truth >= 0
    kept = int(kept_mask.sum())
    if kept == 0:
        raise ValueError("no neuron responds clearly to any concept (every truth_index is -1): nothing to score; "
                         "lower min_auroc in true_neuron_concepts or use more probe images")
    matched = (label_in_truth == truth) & kept_mask
    hits = matched[kept_mask].numpy().astype(np.float64)
    rate = float(hits.mean())
    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2
    boot = hits[rng.integers(0, kept, size=(resamples, kept))].mean(axis=1)
    ci = (float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail)))
    given, true = label_in_truth[kept_mask].numpy(), truth[kept_mask].numpy()
    shuffled = np.stack([given[rng.permutation(kept)] for _ in range(resamples)])
    null = (shuffled == true[None, :]).mean(axis=1)
    # The permutation mean has a closed form: sum over concepts of (#labelled c)(#truly c) / kept^2.
    classes = int(max(given.max(), true.max())) + 1
    labelled = np.bincount(given[given >= 0], minlength=classes)  # labels outside the truth never match
    truly = np.bincount(true, minlength=classes)
    baseline = float((labelled * truly).sum() / kept**2)
    baseline_ci = (float(np.quantile(null, tail)), float(np.quantile(null, 1 - tail)))
    p_value = float((1 + (null >= rate - 1e-12).sum()) / (1 + resamples))
    low, high = scipy.stats.binom.interval(confidence, kept, 1 / pool)
    return MatchRate(rate, ci, kept, total, baseline, baseline_ci, p_value, 1 / pool,
                     (float(low) / kept, float(high) / kept), matched, kept_mask, confidence, labels.method)
