"""mmelkit: a workbench for explainable multimodal (CLIP-style) models.

Two lines to a model::

    import mmelkit
    model = mmelkit.load_model("toy-random")     # or an open_clip / Hugging Face CLIP spec

See ``mmelkit.models`` for adapters and tracing, ``mmelkit.course`` for the notebook runner.
"""

from __future__ import annotations

# Must run before anything imports open_clip (and with it torchvision): see _compat's docstring.
from mmelkit import _compat

_compat.apply()

from mmelkit.methods import explain, list_methods  # noqa: E402
from mmelkit.models import (  # noqa: E402
    BlockTrace,
    ClipAdapter,
    ModelTrace,
    TextTokens,
    list_zoo,
    load_model,
    resolve_device,
)
from mmelkit.models.vlm import VlmAdapter, load_vlm  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BlockTrace",
    "ClipAdapter",
    "ModelTrace",
    "TextTokens",
    "VlmAdapter",
    "__version__",
    "explain",
    "list_methods",
    "list_zoo",
    "load_model",
    "load_vlm",
    "resolve_device",
]
