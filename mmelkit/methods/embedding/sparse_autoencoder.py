"""Top-k sparse autoencoders on CLIP image embeddings or a layer's tokens, scored against exact concepts.

A sparse autoencoder (SAE) rewrites each activation vector as a non-negative combination of a few
learned dictionary directions, in the hope that each direction ("feature") stands for one concept.
This module implements the top-k SAE of Gao et al. (2024), *Scaling and evaluating sparse
autoencoders* (arXiv:2406.04093):

* ``z = ReLU(TopK(W_enc (x - b_pre) + b_enc))`` and ``x_hat = W_dec z + b_pre``. Keeping exactly the
  k largest pre-activations fixes the sparsity directly, so no L1 penalty shrinks the codes and no
  sparsity coefficient needs tuning.
* ``b_pre`` starts at the geometric median of the data (or its mean), the encoder starts as the
  decoder's transpose, and the decoder's columns are kept at unit norm: after every step they are
  renormalised, and before it the part of each column's gradient along the column is removed (a
  radial step would only be undone by the renormalisation, yet it still moves Adam's statistics).
* An optional AuxK loss (the paper's fix for dead latents): the ``aux_k`` largest pre-activations of
  latents that have not fired for a while reconstruct the main reconstruction's residual, which
  gives dead latents a gradient towards something useful.

The scene world knows which concepts each scene holds (:func:`mmelkit.datasets.concepts.scene_concepts`),
so the question "does this feature mean one thing?" has an exact answer: each feature is scored by
its best-concept AUROC (how well its activation separates scenes with a concept from scenes
without, for the concept it separates best). :func:`score_dictionary` reports that mean with
bootstrap confidence intervals over features, and its margins over baselines, in two comparisons
that must not be mixed up:

* codes against codes. A top-k code is zero on most rows, and zeros tie: a feature that fires on a
  share q of the rows, all of them holding a concept of prevalence p, scores only 0.5 + q / (2p).
  Sparse features that are *more specific* than the concepts (a "red star" feature, scored against
  "red") are therefore held near 0.5 however clean they are. The fair random baseline for codes is
  a random SAE with the same k, scale and bias (:func:`random_sae_like`), which the same cap holds.
* directions against directions. The SAE's decoder columns, random unit directions and principal
  directions are all scored as dense projections of the activations, one-sided (the direction as
  it is). A random direction's sign is part of its random draw; choosing it afterwards by which
  sign scores better on the evaluation rows would fit the baseline to the very labels it is scored
  on, which the SAE (its sign fixed by training) never gets. A principal direction's sign is
  arbitrary (the solver's), so both signs enter the PCA dictionary as two directions. The
  sign-chosen random figure is still reported (``"random_signless"``), to show what that choice is
  worth.

Training (:func:`train_sae`) runs on any device with a progress bar and is resumable: the batch of
step s is a pure function of (seed, s), and checkpoints hold the model, the Adam state, the step and
the loss history, so N steps, a save and N more give the same parameters as 2N steps in one go.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmelkit._checks import did_you_mean, feature_matrix, positive_int
from mmelkit._io import load_torch
from mmelkit.datasets.concepts import ConceptTable
from mmelkit.methods.base import register_tool

CHECKPOINT_FORMAT = "mmelkit-topk-sae/1"
ActivationSite = Literal["embedding", "cls", "patch_mean", "patches", "neurons", "neurons_cls"]
_LAYERED_SITES = ("cls", "patch_mean", "patches", "neurons", "neurons_cls")

# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class TopKSAE(nn.Module):
    """A top-k sparse autoencoder over ``input_dim``-dimensional activations.

    Inputs are first divided by ``input_scale`` (a buffer, 1 unless training set it so that the
    training data has unit mean norm); :meth:`decode` multiplies it back, so callers see the
    activations' own units throughout. ``decoder.weight`` is (input_dim, n_features): column j is
    feature j's dictionary direction, of unit norm.
    """

    def __init__(self, input_dim: int, n_features: int, k: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_sizes(input_dim, n_features, k)
        self.input_dim, self.n_features, self.k = input_dim, n_features, k
        self.pre_bias = nn.Parameter(torch.zeros(input_dim))
        self.encoder = nn.Linear(input_dim, n_features)
        self.decoder = nn.Linear(n_features, input_dim, bias=False)
        self.register_buffer("input_scale", torch.ones(()))
        # steps since each latent last fired during training; AuxK calls a latent dead from it
        self.register_buffer("steps_since_fired", torch.zeros(n_features, dtype=torch.long))
        directions = torch.randn(input_dim, n_features, generator=generator)
        with torch.no_grad():
            self.decoder.weight.copy_(F.normalize(directions, dim=0))
            # the paper's initialisation: the encoder starts as the decoder's transpose, so that at
            # first each latent reads the direction it writes
            self.encoder.weight.copy_(self.decoder.weight.T)
            self.encoder.bias.zero_()

    @property
    def dictionary(self) -> torch.Tensor:
        """(n_features, input_dim) unit dictionary directions (the decoder's columns, detached)."""
        return self.decoder.weight.detach().T

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_features) encoder outputs before the top-k."""
        return self.encoder(x / self.input_scale - self.pre_bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_features) sparse non-negative codes: at most k non-zeros per row."""
        return self._keep_top(self.pre_activations(x), self.k)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, input_dim) reconstructions, in the activations' own units."""
        return (self.decoder(codes) + self.pre_bias) * self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (N, input_dim), codes (N, n_features))."""
        codes = self.encode(x)
        return self.decode(codes), codes

    @staticmethod
    def _keep_top(pre: torch.Tensor, k: int) -> torch.Tensor:
        # top-k then ReLU: a selected latent with a negative pre-activation contributes nothing,
        # so a row can hold fewer than k non-zeros but never more
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder column to unit norm (after each optimiser step)."""
        self.decoder.weight.div_(self.decoder.weight.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_gradient(self) -> None:
        """Remove from each decoder column's gradient its component along the column (before each step)."""
        grad = self.decoder.weight.grad
        if grad is None:
            return
        weight = self.decoder.weight
        grad.sub_(weight * (grad * weight).sum(dim=0, keepdim=True))


def _check_sizes(input_dim: int, n_features: int, k: int) -> None:
    for name, value in (("input_dim", input_dim), ("n_features", n_features), ("k", k)):
        positive_int(name, value)
    if k > n_features:
        raise ValueError(f"k ({k}) cannot exceed n_features ({n_features}): a code keeps k of the features")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class SaeConfig:
    """How a top-k SAE is trained.

    ``normalise``: divide the inputs by their mean norm over the training data (stored in the SAE, so
    :meth:`TopKSAE.decode` maps back); this keeps one learning rate sensible across layers and models.
    ``bias_init``: start ``b_pre`` at the data's geometric median (the paper) or its mean.
    ``aux_k``: latents used by the AuxK loss; ``"auto"`` is half the input dimension (the paper's
    rule of thumb) capped at ``n_features``, ``None`` turns AuxK off. A latent counts as dead for it
    once it has not fired for ``dead_after_steps`` steps. ``aux_coef`` weighs the AuxK loss (1/32 in
    the paper). Adam's epsilon follows the paper (6.25e-10); gradients are clipped to norm
    ``grad_clip``. The learning rate is constant, so a run can be extended by raising ``steps``.
    """

    n_features: int = 512
    k: int = 8
    lr: float = 1e-3
    steps: int = 3_000
    batch_size: int = 256
    seed: int = 0
    normalise: bool = True
    bias_init: Literal["median", "mean"] = "median"
    aux_k: int | Literal["auto"] | None = "auto"
    aux_coef: float = 1 / 32
    dead_after_steps: int = 200
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 10

    def validate(self) -> None:
        _check_sizes(1, self.n_features, self.k)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "dead_after_steps"):
            positive_int(f"SaeConfig.{name}", getattr(self, name))
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"SaeConfig.seed must be a non-negative integer; got {self.seed!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SaeConfig.{name} must be a positive number; got {value!r}")
        if not (isinstance(self.aux_coef, (int, float)) and math.isfinite(self.aux_coef) and self.aux_coef >= 0):
            raise ValueError(f"SaeConfig.aux_coef must be a number >= 0; got {self.aux_coef!r}")
        if self.bias_init not in ("median", "mean"):
            raise ValueError(f"SaeConfig.bias_init must be 'median' or 'mean'; got {self.bias_init!r}")
        if self.aux_k not in (None, "auto"):
            usable = isinstance(self.aux_k, int) and not isinstance(self.aux_k, bool)
            if not usable or not 1 <= self.aux_k <= self.n_features:
                raise ValueError(f"SaeConfig.aux_k must be None, 'auto' or an integer in 1..n_features "
                                 f"({self.n_features}); got {self.aux_k!r}")

    def resolved_aux_k(self, input_dim: int) -> int:
        """The number of dead latents AuxK uses (0: off)."""
        if self.aux_k is None or self.aux_coef == 0:
            return 0
        if self.aux_k == "auto":
            return min(self.n_features, max(1, input_dim // 2))
        return int(self.aux_k)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (not ``steps``: a run may be extended)."""
        keep = asdict(self)
        for key in ("steps", "checkpoint_every", "log_every"):
            keep.pop(key)
        return keep


@dataclass(eq=False)
class SaeResult:
    """A trained SAE and how training went.

    ``losses`` (steps,) the per-step training loss (normalised MSE plus the weighted AuxK loss);
    ``fvu`` the fraction of variance unexplained on the whole training set (squared reconstruction
    error over squared deviation from the mean); ``firing_rate`` (n_features,) the share of training
    rows on which each feature is non-zero; ``dead_fraction`` the share of features that never fire
    on the training set; ``seconds`` the wall time of all training slices together.
    """

    sae: TopKSAE
    config: SaeConfig
    losses: list[float]
    fvu: float
    firing_rate: torch.Tensor
    dead_fraction: float
    steps: int
    seconds: float
    checkpoint: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def encode(self, activations: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Sparse codes of activations (N, d) -> (N, n_features), in batches, without gradients."""
        return encode_in_batches(self.sae, activations, batch_size)


def _check_activations(activations: Any, name: str = "activations") -> torch.Tensor:
    return feature_matrix(name, activations)


@torch.no_grad()
def encode_in_batches(sae: TopKSAE, activations: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``sae.encode`` over (N, d) in batches, on the SAE's device, without gradients."""
    activations = _check_activations(activations)
    device = sae.decoder.weight.device
    return torch.cat([sae.encode(activations[i:i + batch_size].to(device, torch.float32))
                      for i in range(0, activations.shape[0], batch_size)])


def geometric_median(points: torch.Tensor, iterations: int = 100, tolerance: float = 1e-7) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to the rows of ``points`` (Weiszfeld's
    algorithm, started at the mean); less pulled by outlying rows than the mean is."""
    median = points.mean(dim=0)
    scale = points.norm(dim=1).mean().clamp_min(1e-12)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8 * scale)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tolerance * scale:
            break
    return median


def _data_signature(data: torch.Tensor) -> list[float]:
    # a cheap identity for the training activations, so a checkpoint is not resumed on other data;
    # float64 sums agree across devices to far better than the tolerance used in the comparison
    wide = data.double()
    return [float(data.shape[0]), float(data.shape[1]), float(wide.sum()), float(wide.square().sum())]


def _same_signature(saved: Sequence[float], now: Sequence[float]) -> bool:
    if len(saved) != len(now):
        return False
    return all(math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-9) for a, b in zip(saved, now, strict=True))


def _epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    # numpy's generator keyed by (seed, epoch): the same order on every device and after a resume
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n_rows))


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    # written beside the target and swapped in: an interrupted save leaves the old checkpoint whole
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path, config: SaeConfig, signature: list[float], device: torch.device) -> dict[str, Any]:
    state = load_torch(path, map_location=device)  # a damaged file is a CorruptFileError naming it
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a top-k SAE checkpoint written by train_sae")
    saved_dim, now_dim = int(state["signature"][1]), int(signature[1])
    if saved_dim != now_dim:
        raise ValueError(f"{path} was trained on {saved_dim}-dimensional activations; these are "
                         f"{now_dim}-dimensional. Use another checkpoint path")
    if state["fingerprint"] != config.fingerprint():
        differing = [f"{key}: checkpoint {state['fingerprint'].get(key)!r} vs now {value!r}"
                     for key, value in config.fingerprint().items() if state["fingerprint"].get(key) != value]
        raise ValueError(f"{path} was written with another config ({'; '.join(differing)}). "
                         f"Use another checkpoint path or the same config")
    if not _same_signature(state["signature"], signature):
        raise ValueError(f"{path} was trained on other activations ({int(state['signature'][0])} rows, "
                         f"now {int(signature[0])}, or the same count with other values). Use another "
                         f"checkpoint path")
    return state


def _new_sae(data: torch.Tensor, config: SaeConfig, device: torch.device) -> TopKSAE:
    generator = torch.Generator().manual_seed(config.seed)
    sae = TopKSAE(data.shape[1], config.n_features, config.k, generator=generator)
    sae = sae.to(device)
    with torch.no_grad():
        if config.normalise:
            sae.input_scale.fill_(data.norm(dim=1).mean().clamp_min(1e-12))
        scaled = data / sae.input_scale
        if config.bias_init == "median":
            # the median of a fixed, seeded subsample: Weiszfeld over millions of tokens gains nothing
            rows = scaled.shape[0]
            if rows > 16_384:
                chooser = np.random.default_rng([config.seed, 2**31 - 1])
                keep = torch.from_numpy(chooser.choice(rows, 16_384, replace=False))
                scaled = scaled[keep.to(scaled.device)]
            sae.pre_bias.copy_(geometric_median(scaled))
        else:
            sae.pre_bias.copy_(scaled.mean(dim=0))
    return sae


def _aux_loss(sae: TopKSAE, pre: torch.Tensor, residual: torch.Tensor, aux_k: int, dead_after: int) -> torch.Tensor:
    """AuxK: the top ``aux_k`` dead latents reconstruct the (detached) residual, as normalised MSE."""
    dead = sae.steps_since_fired >= dead_after
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))
    codes = TopKSAE._keep_top(masked, min(aux_k, n_dead))
    guess = sae.decoder(codes)
    spread = (residual - residual.mean(dim=0)).square().sum(dim=1).mean().clamp_min(1e-12)
    return (guess - residual).square().sum(dim=1).mean() / spread


@torch.no_grad()
def _summary(sae: TopKSAE, data: torch.Tensor, batch_size: int = 4096) -> tuple[float, torch.Tensor]:
    """(FVU over all of ``data``, (F,) firing rate)."""
    squared_error = data.new_zeros((), dtype=torch.float64)
    fired = torch.zeros(sae.n_features, device=data.device, dtype=torch.float64)
    for start in range(0, data.shape[0], batch_size):
        chunk = data[start:start + batch_size]
        reconstruction, codes = sae(chunk)
        squared_error += (reconstruction - chunk).double().square().sum()
        fired += (codes > 0).double().sum(dim=0)
    spread = (data.double() - data.double().mean(dim=0)).square().sum().clamp_min(1e-30)
    return float(squared_error / spread), (fired / data.shape[0]).float()


def train_sae(
    activations: torch.Tensor,
    config: SaeConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> SaeResult:
    """Train a top-k SAE on ``activations`` (N, d) with Adam; return it with its training facts.

    ``device``: where to train (default: the activations' device); the activations are moved there
    once. ``checkpoint``: a file to resume from and to write to every ``config.checkpoint_every``
    steps and at the end (atomically). A checkpoint written under another config, for activations
    of another dimension, or for other activations is refused with a ValueError saying which. One
    that has already reached ``config.steps`` is loaded and returned without training.
    """
    config = config or SaeConfig()
    config.validate()
    data = _check_activations(activations)
    target = torch.device(device) if device is not None else data.device
    data = data.to(target, torch.float32)
    n_rows, input_dim = data.shape
    signature = _data_signature(data)
    path = Path(checkpoint) if checkpoint is not None else None

    sae = _new_sae(data, config, target)
    # the paper's Adam: default betas, a tiny epsilon (updates stay scale-free for small gradients)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, eps=6.25e-10)
    start_step, seconds_before, losses = 0, 0.0, []
    if path is not None and path.exists():
        state = _load_checkpoint(path, config, signature, target)
        sae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, seconds_before, losses = int(state["step"]), float(state["seconds"]), list(state["losses"])
    losses = losses[:start_step]

    aux_k = config.resolved_aux_k(input_dim)
    batch_size = min(config.batch_size, n_rows)
    batches_per_epoch = n_rows // batch_size
    with torch.no_grad():
        # the loss is MSE over the data's variance (in the SAE's scaled units): it reads as an FVU
        scaled = data / sae.input_scale
        spread = (scaled - scaled.mean(dim=0)).square().sum(dim=1).mean().clamp_min(1e-12)
        del scaled
    new_losses = torch.zeros(max(0, config.steps - start_step), device=target)
    started = time.perf_counter()

    def save(step: int) -> None:
        if path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(config),
            "fingerprint": config.fingerprint(),
            "signature": signature,
            "model": sae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "losses": losses + new_losses[: step - start_step].tolist(),
            "seconds": seconds_before + time.perf_counter() - started,
        }
        _save_atomically(state, path)

    sae.train()
    bar = tqdm(total=config.steps, initial=min(start_step, config.steps), disable=not progress,
               desc="train top-k SAE", unit="step")
    order, order_epoch = torch.empty(0, dtype=torch.long), -1
    for step in range(start_step, config.steps):
        epoch, position = divmod(step, batches_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(n_rows, config.seed, epoch).to(target), epoch
        batch = data[order[position * batch_size:(position + 1) * batch_size]] / sae.input_scale
        pre = sae.encoder(batch - sae.pre_bias)
        codes = sae._keep_top(pre, config.k)
        reconstruction = sae.decoder(codes) + sae.pre_bias
        residual = batch - reconstruction
        loss = residual.square().sum(dim=1).mean() / spread
        if aux_k:
            loss = loss + config.aux_coef * _aux_loss(sae, pre, residual.detach(), aux_k, config.dead_after_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_gradient()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
        optimizer.step()
        sae.normalise_decoder()
        with torch.no_grad():
            fired = (codes > 0).any(dim=0)
            sae.steps_since_fired.add_(1).masked_fill_(fired, 0)
            new_losses[step - start_step] = loss.detach()
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == config.steps:
            bar.set_postfix(loss=f"{float(new_losses[step - start_step]):.4f}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
    bar.close()
    elapsed = seconds_before + time.perf_counter() - started
    losses = losses + new_losses.tolist()

    sae.eval()
    fvu, firing_rate = _summary(sae, data)
    return SaeResult(sae=sae, config=config, losses=losses, fvu=fvu, firing_rate=firing_rate,
                     dead_fraction=float((firing_rate == 0).float().mean()), steps=max(start_step, config.steps),
                     seconds=elapsed, checkpoint=path)


# --------------------------------------------------------------------------------------------------
# Scoring against exact concepts
# --------------------------------------------------------------------------------------------------


def _presence_matrix(presence: torch.Tensor | ConceptTable, n_rows: int) -> tuple[torch.Tensor, list[str] | None]:
    names = None
    if isinstance(presence, ConceptTable):
        names, presence = presence.names, presence.presence
    if not isinstance(presence, torch.Tensor) or presence.ndim != 2 or presence.dtype != torch.bool:
        shape = tuple(presence.shape) if isinstance(presence, torch.Tensor) else type(presence).__name__
        raise ValueError(f"presence must be a (N, C) bool tensor or a ConceptTable; got {shape}")
    if presence.shape[0] != n_rows:
        raise ValueError(f"presence has {presence.shape[0]} rows but the activations have {n_rows}")
    if presence.shape[1] == 0:
        raise ValueError("presence holds no concepts")
    counts = presence.sum(dim=0)
    degenerate = ((counts == 0) | (counts == n_rows)).nonzero().flatten().tolist()
    if degenerate:
        which = [names[i] if names else str(i) for i in degenerate]
        raise ValueError(f"concepts {', '.join(which)} have no positives or no negatives among the {n_rows} rows, "
                         f"so no AUROC exists for them; drop them (ConceptTable.present() does)")
    return presence, names


def feature_concept_auroc(
    codes: torch.Tensor, presence: torch.Tensor | ConceptTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's best-concept AUROC: ((F,) best AUROC, (F,) index of that concept).

    ``codes`` (N, F) feature activations; ``presence`` (N, C) bool or a ConceptTable over the same
    N rows. A feature's score is its activation used as is (larger means "concept present"), since
    SAE features are non-negative and fire in one direction; a feature that never fires ties every
    row and scores 0.5. Every concept needs positives and negatives (else a ValueError).
    """
    codes = _check_activations(codes, "codes")
    matrix, _ = _presence_matrix(presence, codes.shape[0])
    from mmelkit.metrics.concepts import auroc  # here: mmelkit.metrics imports mmelkit.methods

    table = auroc(codes, matrix.to(codes.device))
    best, concept = table.max(dim=1)
    return best, concept


def direction_concept_auroc(
    activations: torch.Tensor,
    directions: torch.Tensor,
    presence: torch.Tensor | ConceptTable,
    *,
    signless: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-concept AUROC of the projections of ``activations`` (N, d) on ``directions`` (F, d).

    Returns ((F,) best AUROC, (F,) concept index). With ``signless`` a direction scores
    ``max(AUROC, 1 - AUROC)`` per concept, the better of the direction and its negation, chosen on
    these very rows; :func:`score_dictionary` scores its dictionaries one-sided and reports the
    signless random figure only beside them (see the module docstring).
    """
    activations = _check_activations(activations)
    directions = _check_activations(directions, "directions")
    if directions.shape[1] != activations.shape[1]:
        raise ValueError(f"directions are {directions.shape[1]}-dimensional; "
                         f"activations {activations.shape[1]}-dimensional")
    matrix, _ = _presence_matrix(presence, activations.shape[0])
    projections = activations @ directions.to(activations.device, activations.dtype).T
    from mmelkit.metrics.concepts import auroc

    table = auroc(projections, matrix.to(activations.device))
    if signless:
        table = torch.maximum(table, 1 - table)
    best, concept = table.max(dim=1)
    return best, concept


def random_directions(count: int, dim: int, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """(count, dim) unit directions drawn uniformly on the sphere (seeded, the same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, dim, generator=generator), dim=1).to(device)


def pca_directions(activations: torch.Tensor, count: int) -> torch.Tensor:
    """(min(count, d, N), d) the leading principal directions of ``activations`` (N, d), by variance."""
    activations = _check_activations(activations)
    centred = activations.double() - activations.double().mean(dim=0)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    keep = min(count, right.shape[0])
    return right[:keep].to(activations.dtype)


@dataclass
class MeanWithInterval:
    """A mean over directions with its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    count: int


def _bootstrap_mean(values: torch.Tensor, draws: int, level: float,
                    generator: np.random.Generator) -> MeanWithInterval:
    sample = values.double().cpu().numpy()
    means = sample[generator.integers(0, len(sample), size=(draws, len(sample)))].mean(axis=1)
    tail = (1 - level) / 2
    return MeanWithInterval(float(sample.mean()), float(np.quantile(means, tail)),
                            float(np.quantile(means, 1 - tail)), len(sample))


def _bootstrap_difference(first: torch.Tensor, second: torch.Tensor, draws: int, level: float,
                          generator: np.random.Generator) -> MeanWithInterval:
    # the two sets of directions are independent, so each is resampled on its own
    a, b = first.double().cpu().numpy(), second.double().cpu().numpy()
    means_a = a[generator.integers(0, len(a), size=(draws, len(a)))].mean(axis=1)
    means_b = b[generator.integers(0, len(b), size=(draws, len(b)))].mean(axis=1)
    differences = means_a - means_b
    tail = (1 - level) / 2
    return MeanWithInterval(float(a.mean() - b.mean()), float(np.quantile(differences, tail)),
                            float(np.quantile(differences, 1 - tail)), len(a))


def random_sae_like(sae: TopKSAE, seed: int = 0) -> TopKSAE:
    """An untrained top-k SAE with ``sae``'s sizes, k, input scale and pre-encoder bias but random
    unit directions (encoder = decoder transpose, zero encoder bias): the sparsity-matched random
    baseline for its codes. Only the directions differ, so a margin over it is what training added."""
    generator = torch.Generator().manual_seed(seed)
    twin = TopKSAE(sae.input_dim, sae.n_features, sae.k, generator=generator).to(sae.decoder.weight.device)
    with torch.no_grad():
        twin.input_scale.copy_(sae.input_scale)
        twin.pre_bias.copy_(sae.pre_bias)
    return twin.eval()


@dataclass(eq=False)
class DictionaryScores:
    """Best-concept AUROC of an SAE's features against random and principal directions.

    ``summary`` maps each dictionary to the mean over its directions of the best-concept AUROC,
    with a bootstrap CI over directions:

    * ``"sae"``: the SAE's codes (alive features only), one-sided;
    * ``"random_sae"``: the codes of :func:`random_sae_like` (same k, scale and bias, random
      directions), one-sided: the baseline with the same sparsity;
    * ``"sae_directions"``: projections on the SAE's decoder columns (alive features), one-sided;
    * ``"random"``: projections on random unit directions, one-sided;
    * ``"pca"``: projections on principal directions and on their negations, one-sided;
    * ``"random_signless"``: the random directions again, each scoring the better of itself and its
      negation on the evaluation rows (reported, not a baseline: the sign is then fitted to them).

    ``margins`` holds differences of means with bootstrap CIs: ``"sae - random_sae"``,
    ``"sae - random"``, ``"sae - pca"``, ``"sae_directions - random"``, ``"sae_directions - pca"``.
    ``per_direction``, ``best_concept`` and ``indices`` hold each dictionary's (F,) scores, concept
    indices and direction indices (for ``"sae"`` and ``"random_sae"``: the features that fire on
    some evaluation row; a feature that never fires says nothing about any concept). ``alive``
    (n_features,) marks the SAE's firing features; ``concept_names`` name the concepts.
    """

    summary: dict[str, MeanWithInterval]
    margins: dict[str, MeanWithInterval]
    per_direction: dict[str, torch.Tensor]
    best_concept: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    alive: torch.Tensor
    concept_names: list[str] | None
    level: float

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per dictionary and then per margin: ``mean_best_auroc`` (for
        a margin, the difference), ``ci_low``, ``ci_high`` and ``directions`` (the count scored;
        for a margin, the first dictionary's)."""
        import pandas as pd

        rows = [{"dictionary": name, "mean_best_auroc": s.mean, "ci_low": s.low, "ci_high": s.high,
                 "directions": s.count} for name, s in {**self.summary, **self.margins}.items()]
        return pd.DataFrame(rows)

    def feature_frame(self, dictionary: str = "sae") -> Any:
        """A pandas DataFrame of one dictionary's directions: index, best concept and its AUROC."""
        import pandas as pd

        if dictionary not in self.per_direction:
            raise KeyError(f"no dictionary {dictionary!r}; dictionaries: {', '.join(self.per_direction)}")
        concepts = self.best_concept[dictionary].tolist()
        names = [self.concept_names[c] if self.concept_names else c for c in concepts]
        return pd.DataFrame({"direction": self.indices[dictionary].tolist(), "best_concept": names,
                             "best_auroc": self.per_direction[dictionary].tolist()})


def score_dictionary(
    sae: TopKSAE,
    activations: torch.Tensor,
    presence: torch.Tensor | ConceptTable,
    *,
    pca_fit: torch.Tensor | None = None,
    n_random: int | None = None,
    seed: int = 0,
    bootstrap: int = 2_000,
    level: float = 0.95,
) -> DictionaryScores:
    """Score an SAE's features on evaluation ``activations`` (N, d) against exact concept ``presence``.

    Two comparisons, because a top-k code and a projection are not alike (see the module
    docstring): the SAE's codes against the codes of a random SAE of the same sparsity
    (:func:`random_sae_like`), both with :func:`feature_concept_auroc`; and the SAE's decoder
    directions against random unit directions and principal directions (both signs), all one-sided,
    all with :func:`direction_concept_auroc`. Only features that fire on some evaluation row are
    scored. ``n_random`` random directions (default: as many as the SAE has firing features) and
    min(that, d) principal directions, fitted on ``pca_fit`` when given (e.g. the SAE's training
    activations, so no dictionary has seen the evaluation rows), else on ``activations``. Means get
    percentile-bootstrap CIs over directions (``bootstrap`` draws at ``level``), margins an
    independent bootstrap of both sides.
    """
    activations = _check_activations(activations)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")
    positive_int("bootstrap", bootstrap)
    if activations.shape[1] != sae.input_dim:
        raise ValueError(f"the SAE reads {sae.input_dim}-dimensional activations; "
                         f"these are {activations.shape[1]}-dimensional")
    matrix, names = _presence_matrix(presence, activations.shape[0])
    evaluated = activations.to(sae.decoder.weight.device, torch.float32)
    matrix = matrix.to(evaluated.device)
    per_direction: dict[str, torch.Tensor] = {}
    best_concept: dict[str, torch.Tensor] = {}
    indices: dict[str, torch.Tensor] = {}

    def score_codes(name: str, model: TopKSAE) -> torch.Tensor:
        codes = encode_in_batches(model, evaluated)
        firing = (codes > 0).any(dim=0)
        if not bool(firing.any()):
            raise ValueError(f"no feature of the {name} dictionary fires on these activations; nothing to score")
        indices[name] = firing.nonzero().flatten()
        per_direction[name], best_concept[name] = feature_concept_auroc(codes[:, firing], matrix)
        return firing

    alive = score_codes("sae", sae)
    score_codes("random_sae", random_sae_like(sae, seed))
    count = int(alive.sum()) if n_random is None else n_random
    positive_int("n_random", count)
    # input_scale is a scalar, so the decoder columns are directions in the activations' own space
    random_rows = random_directions(count, sae.input_dim, seed, evaluated.device)
    components = pca_directions(evaluated if pca_fit is None else pca_fit.to(evaluated.device, torch.float32), count)
    directions = {
        "sae_directions": (sae.dictionary[alive], False, indices["sae"]),
        "random": (random_rows, False, None),
        "pca": (torch.cat([components, -components]), False, None),  # the solver's sign is arbitrary: both
        "random_signless": (random_rows, True, None),
    }
    for name, (rows, signless, index) in directions.items():
        per_direction[name], best_concept[name] = direction_concept_auroc(evaluated, rows, matrix, signless=signless)
        indices[name] = index if index is not None else torch.arange(rows.shape[0], device=evaluated.device)

    generator = np.random.default_rng(seed)
    summary = {name: _bootstrap_mean(per_direction[name], bootstrap, level, generator)
               for name in ("sae", "random_sae", "sae_directions", "random", "pca", "random_signless")}
    pairs = [("sae", "random_sae"), ("sae", "random"), ("sae", "pca"), ("sae_directions", "random"),
             ("sae_directions", "pca")]
    margins = {f"{first} - {second}": _bootstrap_difference(per_direction[first], per_direction[second], bootstrap,
                                                            level, generator) for first, second in pairs}
    return DictionaryScores(summary=summary, margins=margins, per_direction=per_direction, best_concept=best_concept,
                            indices=indices, alive=alive, concept_names=names, level=level)


# --------------------------------------------------------------------------------------------------
# On a model
# --------------------------------------------------------------------------------------------------


def site_activations(
    model: Any,
    images: Any,
    *,
    site: ActivationSite = "embedding",
    layer: int | None = None,
    batch_size: int = 64,
    cache: Any = None,
    progress: bool = True,
) -> torch.Tensor:
    """(N, D) activations of ``images`` at one site of :func:`mmelkit.models.activations.collect_activations`:
    ``"embedding"`` (the unnormalised image embedding, ``layer`` None); ``"cls"``, ``"patch_mean"``,
    ``"neurons"`` or ``"neurons_cls"`` of block ``layer`` (negative counts from the last); or
    ``"patches"``, every patch token after block ``layer`` flattened to (N * P, D) rows, image-major
    (so codes of the tokens of image i are rows i * P to (i + 1) * P)."""
    from mmelkit.models.activations import collect_activations

    if site == "embedding":
        if layer is not None:
            raise ValueError("site 'embedding' has no layer; pass layer=None")
        acts = collect_activations(model, images, sites=("embedding",), batch_size=batch_size, cache=cache,
                                   progress=progress)
        return acts["embedding", None]
    if site not in _LAYERED_SITES:
        raise ValueError(f"unknown site {site!r};{did_you_mean(site, ['embedding', *_LAYERED_SITES])} sites: "
                         f"embedding, {', '.join(_LAYERED_SITES)}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"site {site!r} needs an integer layer; got {layer!r}")
    acts = collect_activations(model, images, sites=(site,), layers=[layer], batch_size=batch_size, cache=cache,
                               progress=progress)
    values = acts[site, layer]
    return values.flatten(0, 1) if site == "patches" else values


@register_tool("sparse_autoencoder", level="model", granularity="embedding", family="dictionary learning",
               reference="Gao et al., arXiv 2406.04093 (top-k SAE); SPEC §7")
def sae_on_model(
    model: Any,
    images: Any,
    *,
    site: ActivationSite = "embedding",
    layer: int | None = None,
    config: SaeConfig | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    cache: Any = None,
) -> SaeResult:
    """Collect ``images``' activations at ``site`` / ``layer`` (:func:`site_activations`) and train a
    top-k SAE on them (:func:`train_sae`); ``extras["activations"]`` keeps the training activations."""
    activations = site_activations(model, images, site=site, layer=layer, batch_size=batch_size, cache=cache,
                                   progress=progress)
    result = train_sae(activations, config, checkpoint=checkpoint, progress=progress, device=device)
    result.extras.update({"site": site, "layer": layer, "activations": activations})
    return result
