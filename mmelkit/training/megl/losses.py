"""MEGL's losses (SPEC section 3), each a plain function of tensors.

Conventions: ``maps`` are the classifier's normalised Grad-CAMs at the image's resolution, in
[0, 1], shape (N, H, W); ``masks`` are ground-truth masks (N, H, W) in [0, 1]; ``has_mask`` (N,)
says which samples have one (a withheld mask is any placeholder, it is never read). Per-sample
losses return (N,); :func:`masked_mean` averages them over the samples that have the
annotation, and is 0 (with a graph, never NaN) when no sample in the batch has one.

* L_cls: cross-entropy.
* L_att (samples with a mask): ``l1`` = mean |A_hat - A|, plus one of
  ``gradia`` (the l1 restricted to the mask's positive part: the map must cover the evidence),
  ``haics`` (binary cross-entropy of the map against the mask: both parts, and a stronger push
  than l1 near 0 and 1), ``rrr`` (Right for the Right Reasons: squared input gradients of
  sum_k log p_k outside the mask).
* L_txt (SDTG): the rationale's negative log-likelihood under the generator.
* L_tsv (samples without a mask): mean |A_hat - A_T| with A_T a pseudo-mask from a CLIP
  explanation of the rationale.
* L_dc: KL(P_bar_y || P_hat + eps), P_hat the map as a distribution, P_bar_y the class's mean
  normalised ground-truth mask.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mmelkit._checks import same_device

AttentionTerm = Literal["l1", "gradia", "haics", "rrr"]
ATTENTION_TERMS: tuple[str, ...] = ("l1", "gradia", "haics", "rrr")


def _check_pair(maps: torch.Tensor, masks: torch.Tensor) -> None:
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps and masks must both be (N, H, W); got {tuple(maps.shape)} and {tuple(masks.shape)}")
    same_device(maps=maps, masks=masks)  # a loss must not copy a batch across devices behind the caller's back


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (N,) over ``keep`` (N,) bool; 0 when nothing is kept (still differentiable)."""
    keep = keep.bool()
    # where, not multiply: a NaN from a withheld placeholder must not leak (NaN * 0 is NaN)
    kept = torch.where(keep, values, torch.zeros_like(values))
    return kept.sum() / keep.sum().clamp_min(1).to(values.dtype)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls: mean cross-entropy."""
    return F.cross_entropy(logits, labels)


def l1_attention(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |A_hat - A| over pixels; 0 exactly when the map equals the mask."""
    _check_pair(maps, masks)
    return (maps - masks).abs().flatten(1).mean(dim=1)


def gradia_attention(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """GRADIA-style: the l1 on the annotated positive region only, sum |A_hat - A| A / sum A.

    Alone it is minimal for any map that is 1 on the mask; next to ``l1`` it stops the trivial
    near-zero map, which the plain l1 favours when masks are small."""
    _check_pair(maps, masks)
    weight = masks.flatten(1)
    return ((maps - masks).abs().flatten(1) * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-6)


def haics_attention(maps: torch.Tensor, masks: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """HAICS-style: per-sample binary cross-entropy of the map against the mask (maps clamped to
    [eps, 1 - eps], so a binary mask is matched with a loss of about eps, never log 0)."""
    _check_pair(maps, masks)
    clamped = maps.clamp(eps, 1.0 - eps)
    return F.binary_cross_entropy(clamped, masks.to(maps.dtype), reduction="none").flatten(1).mean(dim=1)


def rrr_attention(input_grads: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Right for the Right Reasons: per-sample sum of squared input gradients outside the mask.

    ``input_grads`` (N, C, H, W) from :func:`~mmelkit.training.megl.models.input_gradients`; 0
    exactly when the prediction does not depend (locally) on any pixel outside the mask."""
    if input_grads.dim() != 4 or input_grads.shape[:1] + input_grads.shape[2:] != masks.shape:
        raise ValueError(f"input gradients (N, C, H, W) and masks (N, H, W) disagree: "
                         f"{tuple(input_grads.shape)} and {tuple(masks.shape)}")
    outside = (1.0 - masks.to(input_grads.dtype))[:, None]
    return (input_grads * outside).square().flatten(1).sum(dim=1)


def rationale_nll(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> torch.Tensor:
    """SDTG's L_txt = -log p_g(T | ...): per-sample mean token negative log-likelihood (pads ignored)."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits (N, L, V) and targets (N, L) disagree: {tuple(logits.shape)} and {tuple(targets.shape)}")
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=pad, reduction="none")
    counts = (targets != pad).sum(dim=1).clamp_min(1)
    return nll.sum(dim=1) / counts


def textual_supervision(maps: torch.Tensor, pseudo_masks: torch.Tensor) -> torch.Tensor:
    """L_tsv per sample: mean |A_hat - A_T|, A_T the pseudo-mask from a CLIP explanation of the rationale."""
    return l1_attention(maps, pseudo_masks)


def as_distribution(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each map divided by its sum (an all-zero map becomes all zeros)."""
    flat = maps.flatten(1)
    return (flat / flat.sum(dim=1, keepdim=True).clamp_min(eps)).view_as(maps)


def class_mean_masks(masks: torch.Tensor, labels: torch.Tensor, has_mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """P_bar (K, H, W): per class, the mean of its normalised ground-truth masks; a class with no
    mask gets the global mean over all masked samples (uniform when there is none at all)."""
    normalised = as_distribution(masks.float())
    keep = has_mask.bool()
    if keep.any():
        overall = normalised[keep].mean(dim=0)
    else:
        overall = torch.full(masks.shape[1:], 1.0 / masks[0].numel(), device=masks.device)
    priors = []
    for k in range(num_classes):
        chosen = keep & (labels == k)
        priors.append(normalised[chosen].mean(dim=0) if chosen.any() else overall)
    return torch.stack(priors)


def distribution_consistency(maps: torch.Tensor, priors: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L_dc per sample: KL(P_bar_y || P_hat + eps) = sum P_bar log(P_bar / (P_hat + eps)).

    ``priors`` (N, H, W) are each sample's class prior P_bar_y. Minimal (about 0) when the map, as
    a distribution, equals the prior."""
    _check_pair(maps, priors)
    target = priors.flatten(1)
    predicted = as_distribution(maps).flatten(1) + eps
    terms = torch.where(target > 0, target * (target.clamp_min(1e-12).log() - predicted.log()), torch.zeros_like(target))
    return terms.sum(dim=1)
