"""Label-free concept bottleneck over CLIP: a sparse linear classifier that sees only concept scores.

After Label-free CBM (Oikarinen, Das, Nguyen & Weng, "Label-free Concept Bottleneck Models",
ICLR 2023), simplified. For K concept texts ("a circle", "a red object", ...) and a CLIP model:

1. concept activations: s_k(x) = cos(f_I(x), f_T(concept_k)), standardised with the training
   set's mean and standard deviation: z_k(x) = (s_k(x) - mu_k) / sigma_k;
2. class logits from the concepts alone (the bottleneck): logit_c(x) = sum_k W[c, k] z_k(x) + b_c,
   so each logit is exactly the sum of its contributions W[c, k] z_k(x) plus the bias, and a
   prediction is explained by the concepts with the largest contributions to the winning class;
3. W (classes x concepts) and b fitted on labelled images by minimising the elastic-net
   penalised cross-entropy

       F(W, b) = 1/N sum_i CE(W z(x_i) + b, y_i) + lam * (alpha |W|_1 + (1 - alpha)/2 |W|_2^2)

   with full-batch proximal gradient descent (FISTA with gradient-based restart): a gradient
   step on the smooth part (cross-entropy and ridge term), then soft-thresholding of W (never
   of b) at step * lam * alpha. The step is 1/L, L an upper bound of the smooth part's gradient
   Lipschitz constant (||[Z, 1]||_2^2 / (2N) + lam (1 - alpha)), so no line search is needed and
   the run is deterministic. The solver stops when the elastic-net optimality (KKT) residual
   falls below ``tol`` or after ``max_iter`` steps.

Simplified against the paper: there is no learned projection from the image embedding onto the
concept space (the concept layer is CLIP's own image-text cosine, as in the paper's
CLIP-similarity concept layer before its projection step), no filtering of the concept set
(the user's texts are taken as given) and no regularisation path: one ``lam``, one ``alpha``
(the paper's GLM-SAGA solver uses alpha = 0.99 too). The sparsity is what makes the bottleneck
readable: with few non-zero weights per class, the explanation is a short list of concepts.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmelkit._checks import feature_matrix, non_negative_number, positive_int, positive_number, probability
from mmelkit._io import atomic_write_text, read_json
from mmelkit.methods.base import register_tool
from mmelkit.models.adapter import ClipAdapter

__all__ = ["ConceptBottleneck", "ConceptRationale", "SparseLinearFit", "concept_bottleneck", "fit_sparse_linear"]

FORMAT = "mmelkit.concept_bottleneck"
FORMAT_VERSION = 1
DEFAULT_LAM = 1e-2
DEFAULT_ALPHA = 0.99  # Label-free CBM's (GLM-SAGA) mixing: almost pure L1
DEFAULT_MAX_ITER = 5000
DEFAULT_TOL = 1e-6
_CHECK_EVERY = 10  # the KKT residual costs a gradient and a device sync: evaluated every few steps


# --------------------------------------------------------------------------------------------------
# The solver: elastic-net multinomial logistic regression by FISTA
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SparseLinearFit:
    """A fitted sparse linear classifier ``logits = x @ weight.T + bias``: ``weight`` (C, K),
    ``bias`` (C,), float64 on the input's device; ``iterations`` FISTA steps taken; ``residual`` the
    final KKT residual (max over the parameters of the smallest subgradient, 0 at the optimum);
    ``converged`` whether it reached ``tol``."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int
    residual: float
    converged: bool


def _check_labels(labels: Any, count: int, num_classes: int | None, classes: Sequence[str] | None = None) -> tuple[torch.Tensor, int]:
    """(N,) long class indices and the class count; every class must have an example."""
    tensor = torch.as_tensor(labels)
    if tensor.ndim != 1 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D sequence of integer class indices; got {tensor.dtype} of shape "
                         f"{tuple(tensor.shape)}")
    if tensor.numel() != count:
        raise ValueError(f"labels must give one class per image ({count}); got {tensor.numel()}")
    tensor = tensor.long()
    classes_count = int(tensor.max()) + 1 if num_classes is None else positive_int("num_classes", num_classes)
    if int(tensor.min()) < 0 or int(tensor.max()) >= classes_count:
        raise ValueError(f"labels must lie in 0..{classes_count - 1}; got values from {int(tensor.min())} to "
                         f"{int(tensor.max())}")
    if classes_count < 2:
        raise ValueError(f"a classifier needs at least 2 classes; got {classes_count}")
    counts = torch.bincount(tensor.cpu(), minlength=classes_count)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        names = [f"{c} ({classes[c]!r})" if classes is not None else str(c) for c in empty]
        # an unpenalised bias of a class with no example runs to -inf: the fit would never converge
        raise ValueError(f"class {', '.join(names)} has no examples among the labels; drop it or add images")
    return tensor, classes_count


def _smooth_gradient(x: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of 1/N sum CE + ridge/2 |W|^2 with respect to (W, b)."""
    residual = (torch.softmax(x @ weight.T + bias, dim=1) - onehot) / x.shape[0]  # (N, C)
    return residual.T @ x + ridge * weight, residual.sum(dim=0)


def _kkt_residual(x: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lam: float,
                  alpha: float) -> torch.Tensor:
    """Max |smallest subgradient|: |g + lam*alpha*sign(w)| where w != 0, (|g| - lam*alpha)^+ where
    w == 0, |g_b| for the bias. Zero exactly at the elastic-net optimum."""
    grad_w, grad_b = _smooth_gradient(x, onehot, weight, bias, lam * (1 - alpha))
    l1 = lam * alpha
    on = (grad_w + l1 * weight.sign()).abs()
    off = (grad_w.abs() - l1).clamp_min(0)
    return torch.maximum(torch.where(weight != 0, on, off).amax(), grad_b.abs().amax())


def fit_sparse_linear(
    activations: torch.Tensor,
    labels: Any,
    *,
    num_classes: int | None = None,
    lam: float = DEFAULT_LAM,
    alpha: float = DEFAULT_ALPHA,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> SparseLinearFit:
    """Elastic-net multinomial logistic regression on a concept matrix ``activations`` (N, K) and
    class indices ``labels`` (N,), by FISTA with soft-thresholding of W (the bias is unpenalised).

    Minimises 1/N sum_i CE(W x_i + b, y_i) + lam (alpha |W|_1 + (1 - alpha)/2 |W|_2^2) in float64 on
    the activations' device. The features are used as given (standardise them first for ``lam`` to
    mean the same for every column). Warns (RuntimeWarning) when ``max_iter`` is reached before
    the KKT residual is below ``tol``: with lam = 0 on separable data no optimum exists and the
    weights grow without bound."""
    x = feature_matrix("activations", activations).detach().double()
    lam = non_negative_number("lam", lam)
    alpha = probability("alpha", alpha)
    max_iter = positive_int("max_iter", max_iter)
    tol = positive_number("tol", tol)
    y, classes = _check_labels(labels, x.shape[0], num_classes)
    count, width = x.shape
    onehot = F.one_hot(y.to(x.device), classes).double()
    ridge, l1 = lam * (1 - alpha), lam * alpha
    # Lipschitz bound: softmax's Hessian in the logits has eigenvalues <= 1/2, and the logits are
    # linear in (W, b) through [X, 1]
    augmented = torch.cat([x, x.new_ones(count, 1)], dim=1)
    lipschitz = 0.5 * float(torch.linalg.eigvalsh(augmented.T @ augmented)[-1]) / count + ridge
    step = 1.0 / max(lipschitz, 1e-12)
    threshold = step * l1

    weight = x.new_zeros(classes, width)
    bias = x.new_zeros(classes)
    look_w, look_b = weight, bias  # the extrapolated point FISTA takes its gradient at
    t = x.new_ones(())
    residual = math.inf
    iterations = 0
    for iterations in range(1, max_iter + 1):
        grad_w, grad_b = _smooth_gradient(x, onehot, look_w, look_b, ridge)
        moved = look_w - step * grad_w
        new_w = moved.sign() * (moved.abs() - threshold).clamp_min(0)  # prox of step * lam * alpha |W|_1
        new_b = look_b - step * grad_b
        # gradient-based restart (O'Donoghue & Candes 2015): drop the momentum when it points uphill;
        # kept as tensor ops so the loop does not wait on the device every step
        uphill = ((look_w - new_w) * (new_w - weight)).sum() + ((look_b - new_b) * (new_b - bias)).sum() > 0
        t = torch.where(uphill, torch.ones_like(t), t)
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        momentum = (t - 1) / t_next
        look_w = new_w + momentum * (new_w - weight)
        look_b = new_b + momentum * (new_b - bias)
        weight, bias, t = new_w, new_b, t_next
        if iterations % _CHECK_EVERY == 0 or iterations == max_iter:
            residual = float(_kkt_residual(x, onehot, weight, bias, lam, alpha))
            if residual <= tol:
                break
    converged = residual <= tol
    if not converged:
        warnings.warn(f"fit_sparse_linear stopped at max_iter={max_iter} with optimality residual {residual:.2e} > "
                      f"tol={tol:g}; raise max_iter or lam (with lam = 0 on separable data no optimum exists)",
                      RuntimeWarning, stacklevel=2)
    return SparseLinearFit(weight, bias, iterations, residual, converged)


# --------------------------------------------------------------------------------------------------
# The bottleneck over a CLIP model
# --------------------------------------------------------------------------------------------------


def _count(images: Any) -> int | None:
    if isinstance(images, (list, tuple)) or (isinstance(images, torch.Tensor) and images.dim() == 4):
        return len(images)
    return None  # one image (or a form only the adapter knows): counted after preprocessing


def _chunks(model: ClipAdapter, images: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Model input in batches; lists and 4-D tensors are preprocessed one batch at a time."""
    count = _count(images)
    if count == 0:
        raise ValueError("images are an empty batch (N = 0)")
    if count is None:
        pixels = model.as_pixels(images)
        yield from pixels.split(batch_size)
        return
    for start in range(0, count, batch_size):
        yield model.as_pixels(images[start : start + batch_size])


def _cosines(model: ClipAdapter, images: Any, concepts: Sequence[str], batch_size: int) -> torch.Tensor:
    """cos(f_I(x), f_T(concept)) (N, K), float32 on the model's device; each text encoded once."""
    concepts = list(concepts)
    with torch.no_grad():
        text = torch.cat([model.encode_text(concepts[i : i + batch_size]).float()
                          for i in range(0, len(concepts), batch_size)])
        text = F.normalize(text, dim=-1)
        rows = [F.normalize(model.encode_image(chunk).float(), dim=-1) @ text.T
                for chunk in _chunks(model, images, batch_size)]
    return torch.cat(rows)


def _text_list(name: str, values: Any) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of strings; got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty: give at least one text")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{name} holds an empty or non-string entry")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{name} holds duplicates: {repeated}")
    return values


@dataclass(eq=False)
class ConceptRationale:
    """Why one image got its class: ``concepts`` the (text, contribution W[c, k] z_k) pairs with the
    largest contributions to the predicted class ``predicted`` (non-zero weights only, best first);
    ``logit`` that class's logit (= sum of all its contributions + bias)."""

    image: int
    predicted: str
    logit: float
    concepts: list[tuple[str, float]]


@dataclass(eq=False)
class ConceptBottleneck:
    """A fitted concept bottleneck: ``logits = ((s(x) - mean) / std) @ weight.T + bias`` with s(x)
    the image's cosines with the ``concepts`` texts. ``weight`` (C, K), ``bias`` (C,), ``mean`` /
    ``std`` (K,), float32. Methods taking ``(model, images)`` encode the images in batches of
    ``batch_size`` with the concept texts encoded once per call; results are on the model's device."""

    concepts: list[str]
    classes: list[str]
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    lam: float = DEFAULT_LAM
    alpha: float = DEFAULT_ALPHA
    iterations: int = 0
    converged: bool = True
    model_name: str = ""
    batch_size: int = field(default=64, repr=False)

    # -- the concept layer and the class layer --------------------------------------------------
    def concept_activations(self, model: ClipAdapter, images: Any) -> torch.Tensor:
        """Standardised concept activations z(x) (N, K)."""
        cosines = _cosines(model, images, self.concepts, self.batch_size)
        return (cosines - self.mean.to(cosines)) / self.std.to(cosines)

    def logits_from_activations(self, activations: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C) from standardised concept activations (N, K)."""
        return activations @ self.weight.to(activations).T + self.bias.to(activations)

    def logits(self, model: ClipAdapter, images: Any) -> torch.Tensor:
        return self.logits_from_activations(self.concept_activations(model, images))

    def predict(self, model: ClipAdapter, images: Any) -> torch.Tensor:
        """Predicted class indices (N,) into ``classes``."""
        return self.logits(model, images).argmax(dim=-1)

    def contributions(self, model: ClipAdapter, images: Any) -> torch.Tensor:
        """W[c, k] z_k(x) (N, C, K): logit c of image n is ``contributions[n, c].sum() + bias[c]``."""
        activations = self.concept_activations(model, images)
        return self.weight.to(activations)[None] * activations[:, None, :]

    def accuracy(self, model: ClipAdapter, images: Any, labels: Any) -> float:
        """Share of images whose predicted class index equals ``labels`` (N,)."""
        predicted = self.predict(model, images)
        truth = torch.as_tensor(labels, device=predicted.device).flatten()
        if truth.numel() != predicted.numel():
            raise ValueError(f"labels must give one class per image ({predicted.numel()}); got {truth.numel()}")
        return float((predicted == truth).float().mean())

    def explain(self, model: ClipAdapter, images: Any, top: int = 3) -> list[ConceptRationale]:
        """Per image, the ``top`` concepts with the largest contributions to its predicted class."""
        top = positive_int("top", top)
        parts = self.contributions(model, images)  # (N, C, K)
        logits = parts.sum(dim=2) + self.bias.to(parts)
        predicted = logits.argmax(dim=1)
        chosen = parts[torch.arange(len(parts), device=parts.device), predicted]  # (N, K)
        used = self.weight.to(parts.device)[predicted] != 0  # a zero weight is no reason
        ranked = chosen.masked_fill(~used, -math.inf).argsort(dim=1, descending=True)[:, :top].cpu()
        chosen, used, predicted, logits = chosen.cpu(), used.cpu(), predicted.cpu(), logits.cpu()
        out = []
        for n in range(len(parts)):
            picks = [(self.concepts[k], float(chosen[n, k])) for k in ranked[n].tolist() if used[n, k]]
            out.append(ConceptRationale(n, self.classes[int(predicted[n])], float(logits[n, predicted[n]]), picks))
        return out

    # -- reading the weights ------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        """Share of the C x K weights that are exactly zero."""
        return float((self.weight == 0).float().mean())

    def to_frame(self) -> Any:
        """The non-zero weights as a pandas DataFrame (class, concept, weight), by class in order and
        by |weight| within a class."""
        import pandas as pd

        weight = self.weight.detach().cpu()
        rows = [{"class": self.classes[c], "concept": self.concepts[k], "weight": float(weight[c, k])}
                for c, k in weight.nonzero().tolist()]
        frame = pd.DataFrame(rows, columns=["class", "concept", "weight"])
        if frame.empty:
            return frame
        frame["order"] = frame["class"].map({name: i for i, name in enumerate(self.classes)})
        frame["size"] = frame["weight"].abs()
        return frame.sort_values(["order", "size"], ascending=[True, False], ignore_index=True)[
            ["class", "concept", "weight"]]

    # -- files --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bottleneck as JSON (atomically: an interrupted save leaves no partial file)."""
        data = {"format": FORMAT, "version": FORMAT_VERSION, "concepts": self.concepts, "classes": self.classes,
                "weight": self.weight.detach().cpu().float().tolist(), "bias": self.bias.detach().cpu().float().tolist(),
                "mean": self.mean.detach().cpu().float().tolist(), "std": self.std.detach().cpu().float().tolist(),
                "lam": self.lam, "alpha": self.alpha, "iterations": self.iterations, "converged": self.converged,
                "model": self.model_name, "batch_size": self.batch_size}
        return atomic_write_text(path, json.dumps(data))

    @classmethod
    def load(cls, path: str | Path, *, concepts: Sequence[str] | None = None,
             classes: Sequence[str] | None = None) -> ConceptBottleneck:
        """Read a saved bottleneck. Given ``concepts`` / ``classes``, refuse a file fitted for other
        concept texts or other classes (same texts in the same order)."""
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a concept-bottleneck file (no {FORMAT!r} format marker)")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {data.get('version')!r}; this mmelkit reads {FORMAT_VERSION}")
        for name, wanted in (("concepts", concepts), ("classes", classes)):
            if wanted is not None and list(wanted) != data[name]:
                stored = data[name]
                differ = sorted(set(stored) ^ set(wanted))[:5]
                detail = f"texts in one but not the other: {differ}" if differ else "the same texts in another order"
                raise ValueError(f"{path} was fitted for other {name} ({len(stored)} stored, {len(list(wanted))} "
                                 f"given; {detail}); refit the bottleneck for these {name}")
        weight = torch.tensor(data["weight"], dtype=torch.float32)
        bottleneck = cls(list(data["concepts"]), list(data["classes"]), weight,
                         torch.tensor(data["bias"], dtype=torch.float32), torch.tensor(data["mean"], dtype=torch.float32),
                         torch.tensor(data["std"], dtype=torch.float32), float(data["lam"]), float(data["alpha"]),
                         int(data["iterations"]), bool(data["converged"]), str(data.get("model", "")),
                         int(data.get("batch_size", 64)))
        shape = (len(bottleneck.classes), len(bottleneck.concepts))
        if tuple(weight.shape) != shape or bottleneck.bias.shape != (shape[0],) or \
                bottleneck.mean.shape != (shape[1],) or bottleneck.std.shape != (shape[1],):
            raise ValueError(f"{path} is damaged: weight {tuple(weight.shape)} for {shape[0]} classes and {shape[1]} "
                             "concepts")
        return bottleneck


@register_tool("concept_bottleneck", level="model", granularity="architecture", family="concept bottleneck",
               reference="Oikarinen et al., Label-free Concept Bottleneck Models, ICLR 2023; SPEC §5")
def concept_bottleneck(
    model: ClipAdapter,
    images: Any,
    labels: Any,
    concepts: Sequence[str],
    classes: Sequence[str] | None = None,
    *,
    lam: float = DEFAULT_LAM,
    alpha: float = DEFAULT_ALPHA,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    batch_size: int = 64,
) -> ConceptBottleneck:
    """Fit a sparse concept bottleneck on labelled images (see the module doc for the model).

    ``labels`` (N,) class indices into ``classes`` (default: ``"0"``, ``"1"``, ... up to the largest
    label); every class needs at least one image. ``concepts``: the concept texts, in the style of
    the model's captions ("a circle", "a red object"). ``lam`` / ``alpha``: elastic-net strength and
    L1 share (the weights of standardised activations, so ``lam`` means the same for every concept).
    The fit runs on the model's device; the model is only read."""
    concepts = _text_list("concepts", concepts)
    names = None if classes is None else _text_list("classes", classes)
    lam = non_negative_number("lam", lam)
    alpha = probability("alpha", alpha)
    max_iter = positive_int("max_iter", max_iter)
    tol = positive_number("tol", tol)
    batch_size = positive_int("batch_size", batch_size)
    count = _count(images)
    y, num_classes = _check_labels(labels, len(torch.as_tensor(labels)) if count is None else count,
                                   None if names is None else len(names), names)  # before any encoding
    cosines = _cosines(model, images, concepts, batch_size)
    if len(cosines) != len(y):
        raise ValueError(f"labels must give one class per image ({len(cosines)}); got {len(y)}")
    mean = cosines.mean(dim=0)
    std = cosines.std(dim=0, unbiased=False).clamp_min(1e-8)  # a constant concept gets weight 0 anyway
    fit = fit_sparse_linear((cosines - mean) / std, y, num_classes=num_classes, lam=lam, alpha=alpha,
                            max_iter=max_iter, tol=tol)
    return ConceptBottleneck(concepts, names or [str(c) for c in range(num_classes)], fit.weight.float(),
                             fit.bias.float(), mean, std, lam, alpha, fit.iterations, fit.converged, model.name,
                             batch_size)
