"""Work around PyPI's CUDA-only torchvision wheels on a CPU-only torch.

PyPI ships torchvision as CUDA builds. When torch itself is a CPU build, torchvision's compiled
extension ``_C.so`` cannot load, so the operator ``torchvision::nms`` is never defined, and
``torchvision/_meta_registrations.py`` then dies at import time with
``RuntimeError: operator torchvision::nms does not exist`` (pytorch/vision#9085). Because
``open_clip`` imports torchvision, ``import open_clip`` dies with it.

mmelkit never calls torchvision's compiled operators. The fix is to declare the schemas of the two
operators that torchvision registers fake (meta) kernels for, so that its import succeeds. The
operators get no kernel: calling ``torchvision.ops.nms`` still fails, with torch's own
"could not run ... with arguments from the CPU backend" error, which is the honest outcome.

``apply()`` acts only when all of these hold: torch is a CPU build, torchvision is installed and
not yet imported, and its compiled extension cannot be loaded. Otherwise it changes nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

# Schemas as torchvision's C++ extension declares them (torchvision/csrc/ops/nms.cpp, qnms.cpp).
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# Kept alive for the life of the process: a torch.library.Library deregisters its
# definitions when it is garbage collected.
_library: torch.library.Library | None = None
applied = False


def _torchvision_extension_loads(package_dir: str) -> bool:
    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(
        os.path.join(package_dir, "_C*.pyd")
    ):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def needs_patch() -> bool:
    """True when importing torchvision would hit pytorch/vision#9085 on this machine."""
    if torch.version.cuda is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    return not _torchvision_extension_loads(os.path.dirname(spec.origin))


def apply() -> bool:
    """Declare the missing torchvision operator schemas if needed; return whether it acted."""
    global _library, applied
    if applied or not needs_patch():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            _library.define(schema)
    applied = True
    return True
