"""Model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

An explanation that is about the model should change when the model's weights are destroyed.
:func:`randomisation_check` re-initialises the image tower of a COPY of the model, component by
component, explains the same image-text pairs with each method at each step and records the
Spearman rank correlation between each map and the trained model's map of the same pair.

Components, from the top of the image tower down: ``head`` (final norm and projection to the
joint space, plus any pooling head), ``block L-1``, ..., ``block 0``, ``embedding`` (patch
embedding, class and position embeddings, pre-norm). Step 0 is the trained model.

* ``blocks="cascading"`` (default): randomisation accumulates from the top; the last step has the
  whole image tower randomised.
* ``blocks="independent"``: each step randomises its component only, the rest trained.

The text tower is never touched (the target embeddings stay the trained ones).

Re-initialisation (deterministic, device-independent): each parameter tensor p with at least two
elements and non-zero spread is replaced by ``mean(p) + std(p) * eps``, eps ~ N(0, 1) drawn on the
CPU from a generator seeded by ``seed`` and the parameter's qualified name. Scale and offset are
kept (so activations stay in range, layer-norm gains stay near their values), every learned
structure is gone. Parameters with one element or zero spread carry no structure and are kept.

The user's model is never modified and never run: the check deep-copies it (so it needs memory
for a second copy of the model on its device) and rebuilds an adapter around the copy.

Spearman's rho is Pearson's correlation of average ranks (tied values share their mean rank). It
is undefined (NaN) when either map is constant, e.g. an all-zero map; per step, the mean and
standard deviation over pairs skip NaNs and ``pairs`` counts the pairs that had a value.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from mmelkit.methods.base import get_method, image_methods
from mmelkit.models.adapter import ClipAdapter, TextLike

Mode = Literal["cascading", "independent"]
NamedParameters = list[tuple[str, nn.Parameter]]

# Top-level child names of the image tower module that belong to its output head.
_OPEN_CLIP_HEAD = ("ln_post", "proj", "attn_pool", "attn_pool_contrastive", "head")
_HF_HEAD = ("post_layernorm", "head")


# -------------------------------------------------------------------------------------------------
# Spearman rank correlation
# -------------------------------------------------------------------------------------------------


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, float64) along the last dimension; tied values get their average rank."""
    values = values.contiguous()
    ordered = values.sort(dim=-1).values
    below = torch.searchsorted(ordered, values, right=False)  # how many are smaller
    up_to = torch.searchsorted(ordered, values, right=True)  # how many are smaller or equal
    return (below + up_to - 1).to(torch.float64) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho between the rows of ``a`` and ``b`` (N, ...) -> (N,); 1-D inputs -> a 0-d tensor.

    Everything after the first dimension is flattened. NaN for a row where either side is
    constant (no ranking to correlate) or holds a non-finite value.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    single = a.dim() == 1
    a2 = a.detach().reshape(1, -1) if single else a.detach().flatten(1)
    b2 = b.detach().reshape(1, -1) if single else b.detach().flatten(1)
    a2, b2 = a2.to(torch.float64), b2.to(torch.float64)
    ra, rb = average_ranks(a2), average_ranks(b2)
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    denominator = (ra.square().sum(dim=-1) * rb.square().sum(dim=-1)).sqrt()
    rho = (ra * rb).sum(dim=-1) / denominator
    undefined = (denominator == 0) | ~torch.isfinite(a2).all(dim=-1) | ~torch.isfinite(b2).all(dim=-1)
    rho = rho.masked_fill(undefined, float("nan"))
    return rho[0] if single else rho


# -------------------------------------------------------------------------------------------------
# Copying and randomising the model
# -------------------------------------------------------------------------------------------------


def copy_adapter(model: ClipAdapter) -> ClipAdapter:
    """An adapter around a deep copy of ``model``'s network (same device, dtype, tokenizer).

    The backend is copied shallowly and each of its attributes that is part of the network (the
    model, open_clip's ``visual``, ...) is pointed at its counterpart in the copy.
    """
    memo: dict[int, Any] = {}
    network = copy.deepcopy(model.backend.model, memo)
    backend = copy.copy(model.backend)
    for key, value in vars(model.backend).items():
        if isinstance(value, nn.Module):
            if id(value) not in memo:
                raise RuntimeError(f"backend attribute {key!r} is a module outside the model; cannot copy it safely")
            setattr(backend, key, memo[id(value)])
    backend.model = network
    return ClipAdapter(backend, name=f"{model.name} (copy)", device=model.device, dtype=model.dtype)


def image_tower_components(model: ClipAdapter) -> list[tuple[str, NamedParameters]]:
    """The image tower's parameters grouped top-down: head, block L-1, ..., block 0, embedding.

    Names are qualified by the network's own ``named_parameters``. Every parameter of the image
    tower is in exactly one group.
    """
    backend = model.backend
    network = backend.model
    qualified = {id(p): name for name, p in network.named_parameters()}
    blocks = backend.image_tower().blocks
    if backend.family == "open_clip":
        tower, head_names, extra_head = network.visual, _OPEN_CLIP_HEAD, []
    elif backend.family == "hf_clip":
        tower, head_names, extra_head = network.vision_model, _HF_HEAD, [network.visual_projection]
    else:
        raise NotImplementedError(f"randomisation check: no image tower layout for model family {backend.family!r}")
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    head: NamedParameters = []
    embedding: NamedParameters = []
    for name, parameter in tower.named_parameters():
        if id(parameter) in in_blocks:
            continue
        group = head if name.split(".")[0] in head_names else embedding
        group.append((qualified[id(parameter)], parameter))
    for module in extra_head:
        head.extend((qualified[id(p)], p) for p in module.parameters())
    components: list[tuple[str, NamedParameters]] = [("head", head)]
    for index in reversed(range(len(blocks))):
        components.append((f"block {index}", [(qualified[id(p)], p) for p in blocks[index].parameters()]))
    components.append(("embedding", embedding))
    return components


def reinitialise(parameters: NamedParameters, seed: int) -> None:
    """In place: p <- mean(p) + std(p) * eps, eps ~ N(0, 1) seeded by ``seed`` and p's name.

    Parameters with fewer than two elements or zero (or non-finite) spread are left as they are.
    """
    with torch.no_grad():
        for name, parameter in parameters:
            if parameter.numel() < 2:
                continue
            values = parameter.detach().to(torch.float64)
            mean, std = values.mean(), values.std()
            if not torch.isfinite(std) or std == 0:
                continue
            generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_((mean.cpu() + std.cpu() * noise).to(device=parameter.device, dtype=parameter.dtype))


# -------------------------------------------------------------------------------------------------
# The check
# -------------------------------------------------------------------------------------------------


def default_methods() -> list[str]:
    """Every registered method that explains the image side of a CLIP model."""
    import mmelkit.methods  # noqa: F401  (importing registers every method)

    return image_methods("clip")


def _describe(mode: Mode, components: Sequence[str], step: int) -> str:
    if step == 0:
        return "nothing"
    if mode == "independent":
        return components[step - 1]
    if step == len(components):
        return "whole image tower"
    if step == 1:
        return "head"
    lowest = components[step - 1].split()[-1]
    highest = components[1].split()[-1]
    return f"head + block {lowest}" if lowest == highest else f"head + blocks {lowest}-{highest}"


def randomisation_check(
    model: ClipAdapter,
    images: Any,
    texts: TextLike,
    methods: list[str] | None = None,
    method_params: dict[str, dict[str, Any]] | None = None,
    blocks: Mode = "cascading",
    seed: int = 0,
    threshold: float = 0.5,
) -> Any:
    """Explain ``images``/``texts`` with each method while the image tower of a copy of ``model``
    is randomised step by step; return a tidy pandas DataFrame, one row per (method, step).

    ``methods``: registered method names (default: every image-side method, see
    :func:`default_methods`); ``method_params``: keyword arguments per method name. Pairing rules
    are the methods' own (N and N, 1 and N, N and 1). Every explanation runs with the global RNG
    seeded by ``seed`` (restored afterwards), so random methods draw the same samples at each step.

    Columns: ``method``, ``step`` (0 = trained), ``component`` (randomised at this step),
    ``randomised`` (what is random at this step), ``spearman_mean`` / ``spearman_std`` (over pairs,
    NaNs skipped), ``pairs`` (pairs with a defined correlation), ``error`` (the exception, if the
    method raised; such rows have NaN correlations and are kept). ``table.attrs`` holds ``mode``,
    ``threshold`` and ``seed`` for :func:`summarise_randomisation`.
    """
    import pandas as pd

    if blocks not in ("cascading", "independent"):
        raise ValueError(f"blocks must be 'cascading' or 'independent'; got {blocks!r}")
    if not isinstance(model, ClipAdapter):
        raise TypeError(f"pass a ClipAdapter (mmelkit.load_model(...)); got {type(model).__name__}")
    names = list(methods) if methods is not None else default_methods()
    if not names:
        raise ValueError("no methods to check")
    method_params = dict(method_params or {})
    stray = sorted(set(method_params) - set(names))
    if stray:
        raise ValueError(f"method_params for method(s) not being checked: {stray}")
    classes = {name: get_method(name) for name in names}

    work = copy_adapter(model)
    pixels = work.as_pixels(images)
    tokens = work.as_tokens(texts)
    components = image_tower_components(work)
    labels = [label for label, _ in components]
    rng_devices = [work.device] if work.device.type == "cuda" else []

    def run(name: str) -> torch.Tensor:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            explanation = classes[name](work, **method_params.get(name, {})).explain(pixels, tokens)
        return explanation.maps.detach().float()

    reference: dict[str, torch.Tensor] = {}
    reference_error: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for step in range(len(components) + 1):
        component = "none" if step == 0 else labels[step - 1]
        saved: list[torch.Tensor] = []
        if step > 0:
            parameters = components[step - 1][1]
            if blocks == "independent":
                saved = [p.detach().clone() for _, p in parameters]
            reinitialise(parameters, seed)
        for name in names:
            row = {"method": name, "step": step, "component": component,
                   "randomised": _describe(blocks, labels, step),
                   "spearman_mean": float("nan"), "spearman_std": float("nan"), "pairs": 0, "error": None}
            rows.append(row)
            if name in reference_error:
                row["error"] = f"on the trained model: {reference_error[name]}"
                continue
            try:
                maps = run(name)
            except Exception as error:  # a method failing is a result to report, not a crash
                message = f"{type(error).__name__}: {error}"
                if step == 0:
                    reference_error[name] = message
                row["error"] = message
                continue
            if step == 0:
                reference[name] = maps
            if maps.shape != reference[name].shape:
                row["error"] = f"map shape {tuple(maps.shape)} differs from the trained model's {tuple(reference[name].shape)}"
                continue
            rho = spearman(reference[name], maps)
            valid = rho[~rho.isnan()]
            row["pairs"] = int(valid.numel())
            if valid.numel():
                row["spearman_mean"] = float(valid.mean())
                row["spearman_std"] = float(valid.std(correction=0))
        if saved:
            with torch.no_grad():
                for (_, parameter), value in zip(components[step - 1][1], saved, strict=True):
                    parameter.copy_(value)
    table = pd.DataFrame(rows)
    table.attrs.update({"mode": blocks, "threshold": float(threshold), "seed": seed})
    return table


def summarise_randomisation(table: Any, threshold: float | None = None) -> Any:
    """One row per method of a cascading :func:`randomisation_check` table.

    ``final_spearman`` is the mean correlation once the whole image tower is randomised (the last
    step). Verdicts: ``"passes"`` when it is below ``threshold`` (default: the table's own),
    ``"fails"`` otherwise (the map survives the destruction of the model), ``"error"`` when the
    method raised at that step, ``"undefined"`` when the correlation is NaN (constant maps).
    Every method of the table is listed; none is hidden.
    """
    import pandas as pd

    mode = table.attrs.get("mode", "cascading")
    if mode != "cascading":
        raise ValueError(
            "summarise_randomisation needs a cascading table: independent randomisation has no step with "
            "the whole image tower randomised (read the table per component instead)"
        )
    if threshold is None:
        threshold = float(table.attrs.get("threshold", 0.5))
    rows = []
    for name, group in table.groupby("method", sort=False):
        group = group.sort_values("step")
        trained, final = group.iloc[0], group.iloc[-1]
        rho = float(final["spearman_mean"])
        if isinstance(final["error"], str):
            verdict = "error"
        elif math.isnan(rho):
            verdict = "undefined"
        else:
            verdict = "passes" if rho < threshold else "fails"
        rows.append({
            "method": name,
            "trained_spearman": float(trained["spearman_mean"]),
            "final_spearman": rho,
            "min_spearman": float(group["spearman_mean"].min()),
            "threshold": threshold,
            "verdict": verdict,
            "error": final["error"] if isinstance(final["error"], str) else None,
        })
    return pd.DataFrame(rows).set_index("method")


__all__ = [
    "average_ranks",
    "copy_adapter",
    "default_methods",
    "image_tower_components",
    "randomisation_check",
    "reinitialise",
    "spearman",
    "summarise_randomisation",
]
