"""Model adapters over open_clip and Hugging Face CLIP, the tracing core, and the model zoo."""

from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.backend import TextTokens
from mmelkit.models.loading import ZOO, list_zoo, load_model, resolve_device
from mmelkit.models.tracing import BlockTrace, ModelTrace

__all__ = ["ZOO", "BlockTrace", "ClipAdapter", "ModelTrace", "TextTokens", "list_zoo", "load_model", "resolve_device"]
