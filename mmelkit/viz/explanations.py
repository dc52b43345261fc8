"""Plotly figures for explanations: a heat map over an image, a grid of methods, word-score bars,
and a small ipywidgets explorer.

Images may be numpy arrays or torch tensors as :func:`mmelkit.models.images.to_float_image`
accepts them ((H, W, 3) uint8 is the usual case), PIL images, or model input: a 4-D float tensor
(N, 3, H, W) as ``model.as_pixels`` returns, normalised with CLIP's mean and std (pass ``mean`` and
``std`` for a model with other statistics). Maps are an :class:`~mmelkit.methods.base.Explanation`
or a bare (h, w) / (N, h, w) array or tensor; they are upsampled (bilinear) to the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots

from mmelkit.methods.base import Explanation, TextExplanation
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD, to_float_image

COLOURSCALE = "Turbo"
Stats = tuple[float, float, float]


def display_image(image: Any, index: int = 0, mean: Stats = OPENAI_MEAN, std: Stats = OPENAI_STD) -> np.ndarray:
    """One image as (H, W, 3) uint8 for display.

    A 4-D float tensor is model input: image ``index`` of the batch is un-normalised with ``mean``
    and ``std``. Anything else goes through :func:`~mmelkit.models.images.to_float_image` (numpy
    (H, W, 3) uint8 or float in [0, 1], torch (3, H, W), PIL, grayscale...).
    """
    if isinstance(image, torch.Tensor) and image.dim() == 4:
        if not image.is_floating_point() or image.shape[1] != 3:
            raise ValueError(
                f"a 4-D tensor must be float model input (N, 3, H, W); got {tuple(image.shape)} {image.dtype}"
            )
        _check_index(index, image.shape[0], "images in the batch")
        pixels = image[index].detach().float().cpu()
        pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    else:
        pixels = to_float_image(image)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def heat_map(explanation_or_map: Any, size: tuple[int, int], index: int = 0) -> np.ndarray:
    """Map ``index`` of an Explanation or of a (N, h, w) / (h, w) array, upsampled to ``size``."""
    if isinstance(explanation_or_map, TextExplanation):
        raise TypeError("a TextExplanation scores words, not image regions: plot it with text_scores_figure")
    if isinstance(explanation_or_map, Explanation):
        maps = explanation_or_map.maps
    elif isinstance(explanation_or_map, (torch.Tensor, np.ndarray)):
        maps = torch.as_tensor(explanation_or_map)
        if maps.dim() == 2:
            maps = maps[None]
        if maps.dim() != 3:
            raise ValueError(f"a map must be (h, w) or (N, h, w); got shape {tuple(maps.shape)}")
    else:
        raise TypeError(f"expected an Explanation or a map array/tensor; got {type(explanation_or_map).__name__}")
    _check_index(index, maps.shape[0], "maps")
    one = maps[index].detach().float().cpu()[None, None]
    if not torch.isfinite(one).all():
        raise ValueError("the map holds NaN or infinite values")
    return F.interpolate(one, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _check_index(index: int, count: int, what: str) -> None:
    if not -count <= index < count:
        raise IndexError(f"index {index} is out of range: there are {count} {what}")


def _heat_trace(heat: np.ndarray, opacity: float, **kwargs: Any) -> go.Heatmap:
    return go.Heatmap(z=heat, opacity=opacity, hovertemplate="x %{x}, y %{y}: %{z:.3f}<extra></extra>", **kwargs)


def _explanation_text(explanation_or_map: Any, index: int) -> str | None:
    if isinstance(explanation_or_map, Explanation) and explanation_or_map.texts:
        return explanation_or_map.texts[index]
    return None


def explanation_overlay(
    image: Any,
    explanation_or_map: Any,
    index: int = 0,
    title: str | None = None,
    opacity: float = 0.5,
    colorscale: str = COLOURSCALE,
    size: int = 360,
) -> go.Figure:
    """The image with map ``index`` over it as a translucent heat map, with a colour bar.

    ``image``: one image, or model input (N, 3, H, W), of which image ``index`` is shown.
    ``explanation_or_map``: an Explanation or a (N, h, w) / (h, w) map. Explanations are drawn on
    [0, 1] (their maps are normalised); bare maps on their own range. Default title: the method
    and the explained text.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1]; got {opacity}")
    picture = display_image(image, index if _is_batch(image) and image.shape[0] > 1 else 0)
    heat = heat_map(explanation_or_map, picture.shape[:2], index)
    bounds = {"zmin": 0.0, "zmax": 1.0} if isinstance(explanation_or_map, Explanation) else {}
    if title is None and isinstance(explanation_or_map, Explanation):
        text = _explanation_text(explanation_or_map, index)
        title = explanation_or_map.method + (f": {text!r}" if text else "")
    figure = go.Figure([
        go.Image(z=picture, hoverinfo="skip"),
        _heat_trace(heat, opacity, colorscale=colorscale, colorbar=dict(title="relevance"), **bounds),
    ])
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed",
                        scaleanchor="x")
    return figure.update_layout(title=title, width=size + 120, height=size + 60,
                                margin=dict(l=10, r=10, t=50 if title else 10, b=10))


def _is_batch(image: Any) -> bool:
    return isinstance(image, torch.Tensor) and image.dim() == 4


def explanation_grid(
    images: Any,
    explanations: Mapping[str, Explanation | torch.Tensor | np.ndarray],
    texts: Sequence[str] | None = None,
    opacity: float = 0.5,
    show_image: bool = True,
    colorscale: str = COLOURSCALE,
    tile: int = 150,
) -> go.Figure:
    """One figure: a row per image-text pair, a column per method (plus the plain image first
    when ``show_image``), one shared colour bar (on [0, 1] when every column is an Explanation).

    ``images``: one image per pair, a single image shared by every pair, or model input
    (N, 3, H, W). ``explanations``: column title -> Explanation, or a bare (N, h, w) map tensor or
    array (an intermediate step, say), each with one map per pair. ``texts``: row titles (default:
    the texts of the first explanation that has them).
    """
    if not explanations:
        raise ValueError("no explanations to show: pass {method name: Explanation}")
    bad = [name for name, e in explanations.items() if not _is_map_batch(e)]
    if bad:
        raise TypeError(
            f"not image explanations or (N, h, w) maps: {bad} (text explanations go to text_scores_figure)"
        )
    counts = {name: len(e) for name, e in explanations.items()}
    rows = next(iter(counts.values()))
    if set(counts.values()) != {rows}:
        raise ValueError(f"every explanation needs the same number of pairs; got {counts}")
    pictures = _image_list(images, rows)
    if texts is None:
        known = [e.texts for e in explanations.values() if isinstance(e, Explanation) and e.texts]
        texts = list(known[0]) if known else ["" for _ in range(rows)]
    texts = list(texts)
    if len(texts) != rows:
        raise ValueError(f"{len(texts)} texts for {rows} pairs")
    names = list(explanations)
    columns = len(names) + int(show_image)
    figure = make_subplots(rows=rows, cols=columns, column_titles=(["image"] if show_image else []) + names,
                           row_titles=[_wrap(t) for t in texts], horizontal_spacing=0.01, vertical_spacing=0.02)
    for row, picture in enumerate(pictures, start=1):
        if show_image:
            figure.add_trace(go.Image(z=picture, hoverinfo="skip"), row=row, col=1)
        for column, name in enumerate(names, start=1 + int(show_image)):
            heat = heat_map(explanations[name], picture.shape[:2], row - 1)
            figure.add_trace(go.Image(z=picture, hoverinfo="skip"), row=row, col=column)
            figure.add_trace(_heat_trace(heat, opacity, coloraxis="coloraxis"), row=row, col=column)
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    figure.update_annotations(font_size=11)
    normalised = all(isinstance(e, Explanation) for e in explanations.values())
    bounds = {"cmin": 0.0, "cmax": 1.0} if normalised else {}
    return figure.update_layout(
        coloraxis=dict(colorscale=colorscale, colorbar=dict(title="relevance"), **bounds),
        width=columns * tile + 200, height=rows * tile + 60, margin=dict(l=5, r=90, t=40, b=5),
    )


def _is_map_batch(value: Any) -> bool:
    if isinstance(value, Explanation):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 3


def _image_list(images: Any, count: int) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a stack of (H, W, 3) images
        images = list(images)
    if _is_batch(images):
        n = images.shape[0]
        if n not in (1, count):
            raise ValueError(f"{n} images for {count} pairs: pass one image per pair or a single image")
        return [display_image(images, i if n == count else 0) for i in range(count)]
    if isinstance(images, (list, tuple)):
        if len(images) not in (1, count):
            raise ValueError(f"{len(images)} images for {count} pairs: pass one image per pair or a single image")
        shown = [display_image(image) for image in images]
        return shown if len(shown) == count else shown * count
    return [display_image(images)] * count  # a single image shared by every pair


def _wrap(text: str, width: int = 22) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join([*lines, line]) if line else "<br>".join(lines)


def text_scores_figure(
    text_explanation: TextExplanation | Mapping[str, TextExplanation],
    index: int = 0,
    title: str | None = None,
    normalise: bool = False,
) -> go.Figure:
    """Word scores of pair ``index`` as bars, in text order; positive bars support the match.

    Pass one TextExplanation, or several as {name: TextExplanation} (of the same texts) for grouped
    bars. ``normalise``: divide each method's scores by their largest absolute value, so methods
    with different units (Grad-ECLIP's shares, IG's score differences) share an axis.
    """
    single = isinstance(text_explanation, TextExplanation)
    named = {"": text_explanation} if single else dict(text_explanation)
    if not named:
        raise ValueError("no text explanations to show")
    bad = [name for name, e in named.items() if not isinstance(e, TextExplanation)]
    if bad:
        raise TypeError(f"not text explanations: {bad or ['the argument']} (image maps go to explanation_overlay)")
    words = None
    figure = go.Figure()
    for name, explanation in named.items():
        _check_index(index, len(explanation), "texts")
        pairs = explanation.words(index)
        these = [w for w, _ in pairs]
        if words is None:
            words = these
        elif these != words:
            raise ValueError(f"{name} explains other words ({these}) than the first explanation ({words})")
        scores = np.array([s for _, s in pairs], dtype=float)
        if normalise and scores.size and np.abs(scores).max() > 0:
            scores = scores / np.abs(scores).max()
        colours = ["#2a7ab0" if s >= 0 else "#c0392b" for s in scores] if single else None
        figure.add_trace(go.Bar(x=list(range(len(these))), y=scores, name=name or explanation.method,
                                marker_color=colours, showlegend=not single,
                                hovertemplate="%{customdata}: %{y:.4f}", customdata=these))
    first = next(iter(named.values()))
    if title is None:
        text = first.texts[index] if first.texts else " ".join(words or [])
        title = f"{first.method if single else 'word scores'}: {text!r}"
    return figure.update_layout(
        title=title, barmode="group", height=340, width=max(420, 90 * len(words or []) + 200),
        xaxis=dict(tickmode="array", tickvals=list(range(len(words or []))), ticktext=words, title="word"),
        yaxis=dict(title="score (max |score| = 1)" if normalise else "score", zeroline=True),
    )


class ExplanationExplorer:
    """An explorer for your own images (the course chapters embed the scene-world explorer,
    :class:`mmelkit.viz.explorer.SceneExplorer`, which also draws scenes and scores the maps).

    An ipywidgets control over one image or a few: a scene dropdown (when several images are
    given), a method dropdown, a text dropdown and a ``layers`` slider (enabled for methods that have
    that parameter) driving a plotly overlay (a ``FigureWidget``, updated in place).

    The same explorer serves both kinds of model. For a CLIP-style model (``load_model``) the texts
    are captions and ``layers`` is the number of last blocks (grad_eclip). For a generative VLM
    (``load_vlm``) the texts are questions, each map explains the model's own answer (shown in the
    title), and ``layers`` averages the last k decoder layers (answer_attention).

    ``explorer.widget`` is the box to display (a notebook shows ``explorer`` itself);
    ``explorer.update()`` recomputes the map for the current choices and returns the Explanation
    (the widgets call it on every change; call it yourself where widgets do not run).
    ``method_params``: extra keyword arguments per method name. ``image_labels``: names of the
    scenes in the dropdown (default "scene 0", "scene 1", ...).
    """

    CLIP_METHODS: tuple[str, ...] = ("grad_eclip", "rollout", "maskclip")
    VLM_METHODS: tuple[str, ...] = ("answer_relevancy", "answer_attention", "answer_gradient_x_input")

    def __init__(
        self,
        model: Any,
        image: Any,
        texts: Sequence[str],
        methods: Sequence[str] | None = None,
        method_params: Mapping[str, Mapping[str, Any]] | None = None,
        opacity: float = 0.5,
        image_labels: Sequence[str] | None = None,
    ) -> None:
        import ipywidgets as widgets

        from mmelkit.methods import get_method
        from mmelkit.models.vlm import VlmAdapter

        self.is_vlm = isinstance(model, VlmAdapter)
        kind = "vlm" if self.is_vlm else "clip"
        methods = list(methods) if methods is not None else list(self.VLM_METHODS if self.is_vlm else self.CLIP_METHODS)
        if not texts or not methods:
            raise ValueError("the explorer needs at least one text and one method")
        self.classes = {name: get_method(name) for name in methods}  # unknown names fail here
        wrong = [name for name, cls in self.classes.items() if getattr(cls, "explains", "clip") != kind]
        if wrong:
            what = "generative VLMs" if kind == "clip" else "CLIP-style models"
            raise ValueError(f"methods {wrong} explain {what}, not this {type(model).__name__}")
        self.images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not self.images:
            raise ValueError("the explorer needs at least one image")
        labels = list(image_labels) if image_labels is not None else [f"scene {i}" for i in range(len(self.images))]
        if len(labels) != len(self.images):
            raise ValueError(f"got {len(labels)} image labels for {len(self.images)} images")
        self.model = model
        self.method_params = {k: dict(v) for k, v in (method_params or {}).items()}
        self.scene = widgets.Dropdown(options=[(label, k) for k, label in enumerate(labels)], value=0, description="scene")
        self.method = widgets.Dropdown(options=methods, description="method")
        self.text = widgets.Dropdown(options=list(texts), description="question" if self.is_vlm else "text")
        depth = model.num_decoder_layers if self.is_vlm else model.num_image_blocks
        self.layers = widgets.IntSlider(value=depth if self.is_vlm else 1, min=1, max=depth, description="layers")
        first = self._explain()
        self.figure = go.FigureWidget(explanation_overlay(self.image, first, title=self._title(first), opacity=opacity))
        controls = ([self.scene] if len(self.images) > 1 else []) + [self.method, self.text, self.layers]
        self.widget = widgets.VBox([widgets.HBox(controls), self.figure])
        for control in (self.scene, self.method, self.text, self.layers):
            control.observe(lambda _change: self.update(), names="value")

    @property
    def image(self) -> Any:
        """The image of the chosen scene."""
        return self.images[self.scene.value]

    def _explain(self) -> Explanation:
        cls = self.classes[self.method.value]
        params = dict(self.method_params.get(self.method.value, {}))
        self.layers.disabled = "layers" not in cls.defaults
        if not self.layers.disabled:
            # CLIP methods count their last blocks; VLM methods take a (start, stop) decoder range
            depth = self.layers.max
            params["layers"] = (depth - self.layers.value, depth) if self.is_vlm else self.layers.value
        return cls(self.model, **params).explain([self.image], [self.text.value])

    def _title(self, explanation: Explanation) -> str | None:
        """A VLM map's title names the question and the answer; a CLIP map keeps the overlay's own."""
        if not self.is_vlm:
            return None
        said = explanation.texts[0] if explanation.texts else ""
        return f"{explanation.method}: {self.text.value} → {said!r}"

    def update(self) -> Explanation:
        explanation = self._explain()
        fresh = explanation_overlay(self.image, explanation, title=self._title(explanation))
        with self.figure.batch_update():
            self.figure.data[0].z = fresh.data[0].z
            self.figure.data[1].z = fresh.data[1].z
            self.figure.layout.title = fresh.layout.title
        return explanation

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


__all__ = [
    "ExplanationExplorer",
    "display_image",
    "explanation_grid",
    "explanation_overlay",
    "heat_map",
    "text_scores_figure",
]
