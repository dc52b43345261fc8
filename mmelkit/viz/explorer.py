"""One explorer for every chapter: a scene-world scene, a model, a method and its parameters, and
what the map is worth, all on widgets (ipywidgets + plotly).

``SceneExplorer(model)`` (or several models by name) shows, for the scene drawn from the chosen
seed, object count and co-occurrence:

* the explanation map over the image, for the chosen text (a caption naming one object for a
  CLIP-style model; a question about the scene for a generative VLM, whose own answer is
  explained);
* its faithfulness: the deletion and insertion curves of a CLIP score (pixels removed / added in
  map order), or for a VLM the deletion curve of p(answer) (visual tokens replaced by the mean
  token in map order);
* its localisation against the exact mask of the object the text names: the pointing game (with
  the protocol's tolerance) and IoU, next to the share of the image the mask covers (what a random
  point would score).

The method's parameters come from the registry (each method's ``defaults``): numbers, booleans and
words get a widget; a value the method refuses is shown in place, in red, and the previous figures
stay (the kernel never dies on a bad value). ``explorer.update()`` recomputes everything for the
current choices and returns a :class:`ExplorerState`; the widgets call it on every change.
``benchmarks/explorer_speed.py`` measures how long an update takes.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from mmelkit.datasets.scenes import Scene, SceneConfig
from mmelkit.datasets.vqa import SceneQA, VqaConfig
from mmelkit.methods.base import Explanation
from mmelkit.viz.explanations import explanation_overlay

CLIP_METHODS: tuple[str, ...] = ("grad_eclip", "mmel", "grad_cam", "rollout", "maskclip", "raw_attention")
VLM_METHODS: tuple[str, ...] = ("answer_relevancy", "answer_attention", "answer_gradient_x_input", "answer_occlusion")
EXPLORER_SEED = 4_000_037  # scenes of their own, apart from every training and evaluation seed


@dataclass
class ExplorerState:
    """What one update computed (the figures show the same)."""

    scene: Scene
    text: str
    explanation: Explanation
    fractions: np.ndarray  # (S,) the perturbed share of the image (pixels or visual tokens)
    curves: dict[str, np.ndarray]  # "deletion" / "insertion" -> (S,) scores
    scores: dict[str, float] = field(default_factory=dict)  # pointing, iou, chance, auc_*


def _is_vlm(model: Any) -> bool:
    from mmelkit.models.vlm import VlmAdapter

    return isinstance(model, VlmAdapter)


def _load(name: str, device: str) -> Any:
    import mmelkit
    from mmelkit.models.vlm.loading import VLM_ZOO

    return mmelkit.load_vlm(name, device=device) if name in VLM_ZOO else mmelkit.load_model(name, device=device)


def scene_texts(scene: Scene, vlm: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The texts the explorer offers for a scene, each with the objects it names: a caption per
    object ("a red circle") for CLIP, questions for a VLM (existence of each object, the colour of
    each shape that is there once, "describe the image .")."""
    if not vlm:
        return [(c.text, tuple(c.objects)) for c in scene.captions_of("object")]
    objects = list(scene.objects)
    shapes = [o.shape for o in objects]
    texts = [(f"is there a {o.name} ?", (k,)) for k, o in enumerate(objects)]
    texts += [(f"what colour is the {o.shape} ?", (k,)) for k, o in enumerate(objects) if shapes.count(o.shape) == 1]
    texts.append(("describe the image .", tuple(range(len(objects)))))
    return texts


class SceneExplorer:
    """Widgets over one model or several (see the module docstring).

    ``models``: a loaded model (``load_model`` / ``load_vlm``), a zoo name, or a mapping or list of
    them (names are loaded on first use, on ``device``). ``methods``: per kind, the method names
    offered (default: a few fast ones of the model's kind). ``steps``: points of each curve.
    ``method_params``: starting parameter values per method.
    """

    def __init__(
        self,
        models: Any,
        methods: Sequence[str] | None = None,
        *,
        seed: int = 0,
        objects: int = 3,
        co_occurrence: float = 0.0,
        steps: int = 8,
        method_params: Mapping[str, Mapping[str, Any]] | None = None,
        device: str = "auto",
    ) -> None:
        import ipywidgets as widgets

        self._models: dict[str, Any] = self._named_models(models)
        self.device = device
        self.steps = int(steps)
        if self.steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        self._methods = list(methods) if methods is not None else None
        self._start_params = {k: dict(v) for k, v in (method_params or {}).items()}
        self._scene_config = SceneConfig()
        top = self._scene_config.max_objects
        self.model = widgets.Dropdown(options=list(self._models), description="model")
        self.seed = widgets.BoundedIntText(value=int(seed), min=0, max=10**9, description="seed")
        self.objects = widgets.IntSlider(value=min(max(int(objects), 1), top), min=1, max=top, description="objects")
        self.co_occurrence = widgets.FloatSlider(value=float(np.clip(co_occurrence, 0, 1)), min=0.0, max=1.0,
                                                 step=0.05, description="co-occur.")
        self.method = widgets.Dropdown(description="method")
        self.text = widgets.Dropdown(description="text")
        self.params_box = widgets.HBox([])
        self.message = widgets.HTML()
        self.scores = widgets.HTML()
        self.overlay = go.FigureWidget()
        self.curves_figure = go.FigureWidget()
        self._param_widgets: dict[str, Any] = {}
        self._quiet = True  # no updates while the widgets are being (re)built
        self._scene: Scene | None = None
        self._texts: list[tuple[str, tuple[int, ...]]] = []
        self._on_model()
        self._quiet = False
        self.state = self.update()
        self.widget = widgets.VBox([
            widgets.HBox([self.model, self.method, self.text]),
            widgets.HBox([self.seed, self.objects, self.co_occurrence]),
            self.params_box,
            self.message,
            widgets.HBox([self.overlay, self.curves_figure]),
            self.scores,
        ])
        self.model.observe(lambda _: self._rebuild(self._on_model), names="value")
        self.method.observe(lambda _: self._rebuild(self._on_method), names="value")
        for control in (self.seed, self.objects, self.co_occurrence):
            control.observe(lambda _: self._rebuild(self._on_scene), names="value")
        self.text.observe(lambda _: self._changed(), names="value")

    # -- models, methods, scenes ----------------------------------------------------------------
    @staticmethod
    def _named_models(models: Any) -> dict[str, Any]:
        if isinstance(models, Mapping):
            named = dict(models)
        elif isinstance(models, (list, tuple)):
            named = {m if isinstance(m, str) else getattr(m, "name", f"model {i}"): m for i, m in enumerate(models)}
        else:
            named = {models if isinstance(models, str) else getattr(models, "name", "model"): models}
        if not named:
            raise ValueError("the explorer needs at least one model")
        return named

    @property
    def current_model(self) -> Any:
        """The chosen model, loaded on first use."""
        name = self.model.value
        if isinstance(self._models[name], str):
            self._models[name] = _load(self._models[name], self.device)
        return self._models[name]

    @property
    def is_vlm(self) -> bool:
        return _is_vlm(self.current_model)

    def _method_names(self) -> list[str]:
        from mmelkit.methods import get_method

        kind = "vlm" if self.is_vlm else "clip"
        wanted = self._methods if self._methods is not None else list(VLM_METHODS if self.is_vlm else CLIP_METHODS)
        return [m for m in wanted if getattr(get_method(m), "explains", "clip") == kind]

    def _on_model(self) -> None:
        names = self._method_names()
        if not names:
            raise ValueError(f"none of the methods {self._methods} explains a {type(self.current_model).__name__}")
        self.method.options = names
        self.method.value = names[0]
        self.text.description = "question" if self.is_vlm else "text"
        self._on_method()
        self._on_scene()

    def _on_method(self) -> None:
        import ipywidgets as widgets

        from mmelkit.methods import get_method

        defaults = dict(get_method(self.method.value).defaults)
        defaults.update(self._start_params.get(self.method.value, {}))
        self._param_widgets = {}
        for name, value in defaults.items():
            if isinstance(value, bool):
                control: Any = widgets.Checkbox(value=value, description=name, indent=False)
            elif isinstance(value, int):
                control = widgets.IntText(value=value, description=name)
            elif isinstance(value, float):
                control = widgets.FloatText(value=value, description=name)
            elif isinstance(value, str):
                control = widgets.Text(value=value, description=name, continuous_update=False)
            else:
                continue  # tuples, None, objects: the method's default stays
            control.layout.width = "200px"
            control.observe(lambda _: self._changed(), names="value")
            self._param_widgets[name] = control
        self.params_box.children = list(self._param_widgets.values())

    def _on_scene(self) -> None:
        config = VqaConfig(scene=self._scene_config, co_occurrence=float(self.co_occurrence.value))
        self._scene = SceneQA(config, seed=EXPLORER_SEED).scene(int(self.seed.value), count=int(self.objects.value))
        self._texts = scene_texts(self._scene, self.is_vlm)
        self.text.options = [t for t, _ in self._texts]
        self.text.value = self._texts[0][0]

    def _rebuild(self, step: Any) -> None:
        self._quiet = True
        try:
            step()
        finally:
            self._quiet = False
        self._changed()

    def _changed(self) -> None:
        if not self._quiet:
            self.update()

    def params(self) -> dict[str, Any]:
        """The method's parameters as the widgets set them."""
        return {name: control.value for name, control in self._param_widgets.items()}

    # -- computing --------------------------------------------------------------------------------
    def compute(self) -> ExplorerState:
        """The map, curves and scores for the current choices (no widget is touched)."""
        from mmelkit.methods import get_method
        from mmelkit.metrics.localisation import mask_iou, pointing_game, protocol_tolerance
        from mmelkit.metrics.perturbation import trapezoid_auc

        model, scene = self.current_model, self._scene
        assert scene is not None
        text = self.text.value
        objects = dict(self._texts)[text]
        method = get_method(self.method.value)(model, **self.params())
        explanation = method.explain([scene.image], [text])
        size = tuple(model.image_size)
        upsampled = explanation.upsample(size)[0].float().cpu()
        mask = torch.from_numpy(scene.mask_of(objects))[None, None].float()
        mask = torch.nn.functional.interpolate(mask, size=size, mode="nearest")[0] > 0.5
        scores: dict[str, float] = {}
        if mask.any():
            tolerance = protocol_tolerance(size[0])
            scores["pointing"] = float(pointing_game(upsampled[None], mask, tolerance=tolerance)[0])
            scores["iou"] = float(mask_iou(upsampled[None], mask)[0])
            scores["chance (mask share)"] = float(mask.float().mean())
        fractions, curves = self._curves(model, scene, text, explanation)
        for name, values in curves.items():
            scores[f"{name} AUC"] = float(trapezoid_auc(torch.as_tensor(fractions), torch.as_tensor(values)))
        return ExplorerState(scene, text, explanation, fractions, curves, scores)

    def _curves(self, model: Any, scene: Scene, text: str, explanation: Explanation) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if _is_vlm(model):
            from mmelkit.bench.vlm import deletion_curves
            from mmelkit.methods.answers import answer_target

            answer = explanation.texts[0] if explanation.texts else None
            target = answer_target(model, [scene.image], [text], [answer] if answer else None)
            curve = deletion_curves(model, target, explanation.maps.flatten(1), self.steps)[0]
            fractions = np.linspace(0.0, 1.0, self.steps + 1)
            return fractions, {"deletion": curve.detach().cpu().numpy()}
        from mmelkit.metrics.faithfulness import deletion_curves as clip_deletion
        from mmelkit.metrics.faithfulness import insertion_curves

        out: dict[str, np.ndarray] = {}
        fractions = np.zeros(0)
        for name, fn in (("deletion", clip_deletion), ("insertion", insertion_curves)):
            result = fn(model, [scene.image], [text], explanation, steps=self.steps)
            fractions = result.fractions.cpu().numpy()
            out[name] = result.scores[0].cpu().numpy()
        return fractions, out

    def update(self) -> ExplorerState | None:
        """Recompute for the current choices and redraw; a method that refuses its parameters (or
        any other error of the computation) is reported in place and the figures stay."""
        try:
            state = self.compute()
        except (ValueError, TypeError, RuntimeError) as error:
            self.message.value = f"<span style='color:#b00'>{html.escape(type(error).__name__)}: {html.escape(str(error))}</span>"
            return None
        self.message.value = ""
        self.state = state
        self._draw(state)
        return state

    def _draw(self, state: ExplorerState) -> None:
        said = state.explanation.texts[0] if self.is_vlm and state.explanation.texts else ""
        title = f"{state.explanation.method}: {state.text}" + (f" → {said!r}" if said else "")
        fresh = explanation_overlay(state.scene.image, state.explanation, title=title, size=320)
        with self.overlay.batch_update():
            if len(self.overlay.data) != len(fresh.data):
                self.overlay.data = ()
                self.overlay.add_traces(fresh.data)
            else:
                for old, new in zip(self.overlay.data, fresh.data, strict=True):
                    old.z = new.z
            self.overlay.layout = fresh.layout
        unit = "visual tokens" if self.is_vlm else "pixels"
        score = "p(answer) / p(answer | whole image)" if self.is_vlm else "cos(image, text)"
        with self.curves_figure.batch_update():
            self.curves_figure.data = ()
            for name, values in state.curves.items():
                self.curves_figure.add_scatter(x=state.fractions, y=values, mode="lines+markers", name=name)
            self.curves_figure.update_layout(width=380, height=320, margin=dict(l=40, r=10, t=40, b=40),
                                             title="deletion / insertion", xaxis_title=f"share of {unit} changed",
                                             yaxis_title=score)
        cells = "".join(f"<td style='padding:0 10px'><b>{html.escape(k)}</b> {v:.3f}</td>" for k, v in state.scores.items())
        self.scores.value = f"<table><tr>{cells}</tr></table>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


__all__ = ["CLIP_METHODS", "EXPLORER_SEED", "VLM_METHODS", "ExplorerState", "SceneExplorer", "scene_texts"]
