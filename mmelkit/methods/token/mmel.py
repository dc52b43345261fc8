"""MMEL: Grad-ECLIP with a hierarchical semantic relationship module (a reconstruction).

Paper: "Multi-Modal Interpretability for Enhanced Localization in Vision-Language Models"
(arXiv 2509.15243). It names the parts (multi-scale feature processing, adaptive attention
weighting with learnable layer-specific weights, cross-modal alignment) but publishes neither
code nor formulas. What follows is mmelkit's RECONSTRUCTION (../shared/SPEC.md section 2); every
step can be switched off for ablation and every constant is a parameter:

1. per-layer maps: the faithful Grad-ECLIP map M_l of each of the last ``layers`` blocks (one
   backward pass for all of them), each min-max normalised;
2. multi-scale (``multi_scale``): M_bar_l = sum_s beta_s upsample(avgpool_s(M_l)) over
   ``scales`` (1, 2, 4) with ``scale_weights`` beta (0.5, 0.3, 0.2);
3. semantic relationship propagation (``propagation``): patch affinity from the block's keys,
   R_l = row-softmax(cos(k_i, k_j) / ``tau``) keeping the ``top_k`` largest entries per row;
   M_tilde_l = (1 - ``gamma``) M_bar_l + ``gamma`` R_l M_bar_l;
4. adaptive layer weighting: M = sum_l softmax(theta)_l M_tilde_l; theta (``layer_weights``)
   defaults to zeros (uniform) and :func:`calibrate_layer_weights` fits it;
5. cross-modal alignment (``alignment``): a_i = minmax_i ReLU(cos(proj(LN_post(z_i)), t)) over the
   last block's patch tokens z_i; M_final = normalise(M * a ** ``eta``).

Which "last-layer patch tokens" z_i? With ``alignment_tokens="value"`` (default) they are the last
block's value path, z_i = v_i W_o + b_o, the tokens MaskCLIP showed keep each patch's own content;
with ``"output"`` they are the block's output tokens, which the last attention has already mixed
across the image. On scene-clip (pointing game, 300 validation scenes of seed 77, not the
reporting seed) "output" made MMEL point worse than its own per-layer maps (66.7% against 88.0%
without alignment) while "value" kept it close (86.3%); pass ``alignment_tokens="output"`` to
reproduce the SPEC's reading.

The paper states a limitation worth testing: scenes with more than 10 objects weaken it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmelkit.methods.architecture.maskclip import value_path_embeddings
from mmelkit.methods.base import (
    Explanation,
    Method,
    minmax_over,
    normalise_maps,
    pair_inputs,
    paired_cosine,
    register,
    text_features,
)
from mmelkit.methods.token.grad_eclip import grad_eclip_block_map
from mmelkit.models.adapter import ClipAdapter, TextLike


@dataclass
class MMELSteps:
    """Every intermediate of MMEL, for teaching and ablation. Maps are (N, K, h, w) per layer (the
    last ``K`` blocks, oldest first) or (N, h, w); all on the model's device."""

    per_layer: torch.Tensor  # step 1: normalised Grad-ECLIP map of each layer
    multi_scale: torch.Tensor  # step 2 (equal to per_layer when switched off)
    propagated: torch.Tensor  # step 3 (equal to multi_scale when switched off)
    layer_weights: torch.Tensor  # step 4: softmax(theta), (K,)
    combined: torch.Tensor  # step 4: weighted sum over layers, (N, h, w)
    alignment: torch.Tensor  # step 5: a, (N, h, w) (ones when switched off)
    final: torch.Tensor  # the explanation, (N, h, w) in [0, 1]


def multi_scale(maps: torch.Tensor, scales: tuple[int, ...], weights: tuple[float, ...]) -> torch.Tensor:
    """sum_s w_s upsample(avgpool_s(maps)) for maps (B, h, w): coarse views of the same evidence.
    Borders that a scale does not divide are pooled over the pixels they have (ceil mode)."""
    if len(scales) != len(weights) or not scales:
        raise ValueError(f"scales {scales} and scale_weights {weights} must be non-empty and of equal length")
    size = maps.shape[-2:]
    total = torch.zeros_like(maps)
    for scale, weight in zip(scales, weights, strict=True):
        if scale < 1:
            raise ValueError(f"scales must be positive integers; got {scale}")
        if scale == 1:
            total = total + weight * maps
            continue
        pooled = F.avg_pool2d(maps[:, None], scale, ceil_mode=True, count_include_pad=False)
        total = total + weight * F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)[:, 0]
    return total


def key_affinity(keys: torch.Tensor, tau: float, top_k: int) -> torch.Tensor:
    """R = row-softmax(cos(k_i, k_j) / tau) over the ``top_k`` most similar patches j of each i.

    ``keys`` (N, P, D) -> (N, P, P), rows summing to 1. Other entries are exactly zero."""
    if tau <= 0:
        raise ValueError(f"tau must be positive; got {tau}")
    unit = F.normalize(keys, dim=-1)
    logits = unit @ unit.transpose(1, 2) / tau
    top_k = min(int(top_k), logits.shape[-1])
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}")
    kept = logits.topk(top_k, dim=-1)
    sparse = torch.full_like(logits, float("-inf")).scatter(-1, kept.indices, kept.values)
    return sparse.softmax(dim=-1)


@register
class MMEL(Method):
    name = "mmel"
    family = "gradient x attention"
    reference = (
        "Multi-Modal Interpretability for Enhanced Localization in Vision-Language Models, arXiv 2509.15243 "
        "(mmelkit reconstruction)"
    )
    defaults: dict[str, Any] = {
        "layers": 4,
        "multi_scale": True,
        "scales": (1, 2, 4),
        "scale_weights": (0.5, 0.3, 0.2),
        "propagation": True,
        "tau": 0.1,
        "top_k": 16,
        "gamma": 0.5,
        "layer_weights": None,  # theta: None (zeros, uniform), a sequence of K numbers or a saved JSON file
        "alignment": True,
        "alignment_tokens": "value",  # "value": the last block's value path; "output": its output tokens
        "eta": 0.5,
    }

    def __init__(self, model: ClipAdapter, **params: Any) -> None:
        super().__init__(model, **params)
        layers = int(self.params["layers"])
        if not 1 <= layers <= model.num_image_blocks:
            raise ValueError(f"layers must lie in 1..{model.num_image_blocks}; got {layers}")
        if self.params["alignment_tokens"] not in ("output", "value"):
            raise ValueError(f"alignment_tokens must be 'output' or 'value'; got {self.params['alignment_tokens']!r}")
        if not 0.0 <= float(self.params["gamma"]) <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1]; got {self.params['gamma']}")
        self.theta = _as_theta(self.params["layer_weights"], layers)

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        parts = self._layer_parts(images, texts)
        params = {**self.params, "layer_weights": self.theta.tolist()}
        return Explanation(self._combine(parts).final, parts.image_size, self.name, params, parts.texts)

    def explain_steps(self, images: Any, texts: TextLike) -> MMELSteps:
        """Run MMEL and return every intermediate (:class:`MMELSteps`)."""
        return self._combine(self._layer_parts(images, texts))

    def _combine(self, parts: _LayerParts) -> MMELSteps:
        weights = torch.softmax(self.theta.to(parts.propagated.device), dim=0)
        combined = torch.einsum("k,nkhw->nhw", weights, parts.propagated)
        final = _final_map(combined, parts.alignment, float(self.params["eta"]))
        return MMELSteps(
            parts.per_layer, parts.multi_scale, parts.propagated, weights, combined, parts.alignment, final
        )

    # -- the parts that do not depend on theta (computed once, also by calibration) ---------------
    def _layer_parts(self, images: Any, texts: TextLike) -> _LayerParts:
        model, params = self.model, self.params
        layers = int(params["layers"])
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        blocks = list(range(-layers, 0))
        # the last block's output is needed for the alignment step even when it is not explained
        traced = sorted(set(blocks) | {-1})
        with torch.enable_grad():  # explanations work inside a caller's no_grad block too
            with model.trace(image_blocks=traced, attention_probs=False) as trace:
                score = paired_cosine(model.encode_image(pixels, normalize=False), targets)
            records = [trace.image[b] for b in blocks]
            grads = torch.autograd.grad(score.sum(), [r.attn_out for r in records])
        with torch.no_grad():
            grid = records[0].grid
            per_layer = torch.stack(
                [
                    normalise_maps(F.relu(grad_eclip_block_map(r, g)).float().reshape(-1, *grid))
                    for r, g in zip(records, grads, strict=True)
                ],
                dim=1,
            )  # (N, K, h, w)
            n, k = per_layer.shape[:2]
            scaled = per_layer
            if params["multi_scale"]:
                scaled = multi_scale(
                    per_layer.flatten(0, 1), tuple(params["scales"]), tuple(params["scale_weights"])
                ).view_as(per_layer)
            propagated = scaled
            if params["propagation"]:
                gamma = float(params["gamma"])
                spread = []
                for layer, record in enumerate(records):
                    keys = record.k[:, :, record.num_prefix_tokens :].transpose(1, 2).flatten(2).float()  # (N, P, D)
                    affinity = key_affinity(keys, float(params["tau"]), int(params["top_k"]))
                    flat = scaled[:, layer].flatten(1)  # (N, P)
                    mixed = (affinity @ flat[:, :, None])[:, :, 0]
                    spread.append(((1 - gamma) * flat + gamma * mixed).view(n, *grid))
                propagated = torch.stack(spread, dim=1)
            if params["alignment"]:
                last = trace.image[-1]
                if params["alignment_tokens"] == "value":
                    # MaskCLIP's value path: v_i W_o + b_o, which keeps each patch's own content
                    patches = value_path_embeddings(model, last)
                else:
                    patches = model.project_image_tokens(last.tokens_out)[:, last.num_prefix_tokens :]
                # the map arithmetic runs in fp32 whatever the model's dtype
                cosine = (F.normalize(patches.float(), dim=-1) * targets.float()[:, None, :]).sum(dim=-1)
                alignment = minmax_over(cosine.clamp_min(0), dim=-1).view(n, *grid)
            else:
                alignment = torch.ones(n, *grid, device=per_layer.device, dtype=per_layer.dtype)
        return _LayerParts(
            per_layer, scaled, propagated, alignment, pixels, targets, tuple(pixels.shape[-2:]), tokens.texts
        )

    # -- calibration of the layer weights ----------------------------------------------------------
    def calibrate(
        self,
        images: Any,
        texts: TextLike,
        iterations: int = 50,
        lr: float = 0.1,
        mu: float = 0.05,
        progress: bool = True,
    ) -> LayerWeights:
        """Fit theta on held-out pairs by minimising the deletion-style objective
        mean_n [S(I * (1 - m)) - S(I * m)] + mu * mean |m|, with m the upsampled final map.

        The penalty is the mean of |m| over pixels (SPEC's ||m||_1 divided by H * W), so one ``mu``
        means the same at every image size.

        Only theta is trained (Adam, ``lr``); the model stays frozen and unchanged. The fitted
        weights are stored on this method (``self.theta``) and returned for saving.
        """
        model = self.model
        parts = self._layer_parts(images, texts)
        eta = float(self.params["eta"])
        theta = self.theta.clone().to(parts.propagated.device).requires_grad_(True)
        optimizer = torch.optim.Adam([theta], lr=lr)
        history: list[float] = []
        size = parts.pixels.shape[-2:]
        for _ in tqdm(range(int(iterations)), disable=not progress, desc="calibrate MMEL", unit="step"):
            with torch.enable_grad():
                combined = torch.einsum("k,nkhw->nhw", torch.softmax(theta, dim=0), parts.propagated)
                mask = F.interpolate(
                    _final_map(combined, parts.alignment, eta)[:, None], size=size, mode="bilinear",
                    align_corners=False,
                )  # (N, 1, H, W); multiplying normalised input by it fades to the mean colour
                kept = paired_cosine(model.encode_image(parts.pixels * mask, normalize=False), parts.targets)
                removed = paired_cosine(model.encode_image(parts.pixels * (1 - mask), normalize=False), parts.targets)
                objective = (removed - kept).mean() + mu * mask.abs().mean()
                (gradient,) = torch.autograd.grad(objective, [theta])
            theta.grad = gradient
            optimizer.step()
            history.append(float(objective.detach()))
        self.theta = theta.detach().cpu()
        return LayerWeights(
            theta=self.theta.tolist(),
            layers=int(self.params["layers"]),
            model=model.name,
            objective=f"mean_n[S(I*(1-m)) - S(I*m)] + {mu} * mean_pixels |m|",
            pairs=len(parts.pixels),
            iterations=int(iterations),
            history=history,
        )


@dataclass
class _LayerParts:
    per_layer: torch.Tensor
    multi_scale: torch.Tensor
    propagated: torch.Tensor
    alignment: torch.Tensor
    pixels: torch.Tensor
    targets: torch.Tensor
    image_size: tuple[int, int]
    texts: list[str] | None


@dataclass
class LayerWeights:
    """Fitted MMEL layer weights (theta) and how they were fitted; JSON on disk."""

    theta: list[float]
    layers: int
    model: str
    objective: str
    pairs: int
    iterations: int
    history: list[float]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LayerWeights:
        data = json.loads(Path(path).read_text())
        missing = {"theta", "layers"} - set(data)
        if missing:
            raise ValueError(f"{path} is not an MMEL layer-weights file (missing {sorted(missing)})")
        defaults = {"model": "?", "objective": "?", "pairs": 0, "iterations": 0, "history": []}
        return cls(**{**defaults, **data})

    @property
    def alpha(self) -> list[float]:
        """softmax(theta): the weight of each layer, oldest first."""
        top = max(self.theta)
        exps = [math.exp(t - top) for t in self.theta]
        return [e / sum(exps) for e in exps]


def _as_theta(value: Any, layers: int) -> torch.Tensor:
    if value is None:
        return torch.zeros(layers)
    if isinstance(value, (str, Path)):
        weights = LayerWeights.load(value)
        value = weights.theta
    elif isinstance(value, LayerWeights):
        value = value.theta
    theta = torch.as_tensor(value, dtype=torch.float32).detach().cpu().flatten()
    if theta.numel() != layers:
        raise ValueError(f"layer_weights has {theta.numel()} entries but layers={layers}")
    if not torch.isfinite(theta).all():
        raise ValueError("layer_weights must be finite")
    return theta


def _final_map(combined: torch.Tensor, alignment: torch.Tensor, eta: float) -> torch.Tensor:
    """normalise(M * a ** eta); differentiable in M (calibration trains through it)."""
    return normalise_maps(combined * alignment.clamp_min(0) ** eta)
