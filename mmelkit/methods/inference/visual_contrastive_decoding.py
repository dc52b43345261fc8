"""Visual Contrastive Decoding (Leng et al., CVPR 2024; SPEC §6) as a decoding option of
:meth:`VlmAdapter.generate`.

At every step the next-token logits of the clean image, l(v), are contrasted with those of a
distorted copy, l(v'), decoded alongside with its own KV cache:

    logits = (1 + alpha) l(v) - alpha l(v'),  kept only where p(v) >= beta * max p(v)

(the adaptive plausibility constraint; the rest is set to -inf). What the model would say from a
blurred view of the image (its language prior, co-occurrence habits) is subtracted. v' is a
forward-diffusion step of the normalised pixels, sqrt(1 - g) x + sqrt(g) eps with noise share g.

Usage: ``vlm.generate(images, questions, logits_hook=VisualContrastiveDecoding(vlm))``. The noise
eps is one fixed pattern (from ``seed``) for every image, so a row's answer does not depend on
the batch it is decoded in.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from mmelkit._checks import non_negative_number, probability, same_device

if TYPE_CHECKING:
    from mmelkit.models.vlm.adapter import VlmAdapter
    from mmelkit.models.vlm.records import DecodeStep, DecodeStream


def vcd_logits(clean: torch.Tensor, distorted: torch.Tensor, alpha: float = 1.0, beta: float = 0.1) -> torch.Tensor:
    """(1 + alpha) * clean - alpha * distorted, -inf where softmax(clean) < beta * its maximum."""
    if clean.shape != distorted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and distorted {tuple(distorted.shape)} logits differ in shape")
    same_device(clean=clean, distorted=distorted)
    probs = clean.float().softmax(dim=-1)
    plausible = probs >= beta * probs.amax(dim=-1, keepdim=True)
    contrasted = (1 + alpha) * clean.float() - alpha * distorted.float()
    return contrasted.masked_fill(~plausible, float("-inf"))


def distort_pixels(pixels: torch.Tensor, noise: float = 0.5, seed: int = 0) -> torch.Tensor:
    """sqrt(1 - noise) * pixels + sqrt(noise) * eps, eps ~ N(0, 1) of one image's shape (seeded,
    the same for every row), computed on the pixels' device and dtype."""
    noise = probability("noise", noise)  # the share of variance replaced by noise
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(pixels.shape[1:], generator=generator, dtype=torch.float32)
    eps = eps.to(pixels.device, pixels.dtype)[None]
    return (1 - noise) ** 0.5 * pixels + noise**0.5 * eps


class VisualContrastiveDecoding:
    """A ``logits_hook``: contrast each step's logits with a distorted image's (see the module doc)."""

    def __init__(self, vlm: VlmAdapter, alpha: float = 1.0, beta: float = 0.1, noise: float = 0.5, seed: int = 0) -> None:
        alpha, beta = non_negative_number("alpha", alpha), probability("beta", beta)
        noise = probability("noise", noise)  # the share of variance replaced by noise
        self.vlm, self.alpha, self.beta, self.noise, self.seed = vlm, alpha, beta, noise, int(seed)
        self._stream: DecodeStream | None = None

    def __call__(self, logits: torch.Tensor, step: DecodeStep) -> torch.Tensor:
        if step.index == 0:  # a new chunk of rows: start its distorted stream
            distorted = replace(step.batch, pixel_values=distort_pixels(step.batch.pixel_values, self.noise, self.seed))
            self._stream = self.vlm.decode_stream(distorted)
            contrast = self._stream.prefill()
        else:
            if self._stream is None or step.last_tokens is None:
                raise RuntimeError("VisualContrastiveDecoding was called mid-decoding without its first step")
            contrast = self._stream.step(step.last_tokens)
        return vcd_logits(logits, contrast, self.alpha, self.beta)

    def __repr__(self) -> str:
        return f"VisualContrastiveDecoding(alpha={self.alpha}, beta={self.beta}, noise={self.noise}, seed={self.seed})"
