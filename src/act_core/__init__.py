"""act_core: Activation Transport (ACT) for any torch model.

Record pooled activations, fit per-unit transport maps, apply them with a strength lambda through
hooks or folded weights, and save them as safetensors. Host-specific code (diffusers, ComfyUI) lives
at the edges; importing this package imports neither. Names are imported on first use, so the
command line can check its arguments before torch loads.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_EXPORTS = {
    "ACTHandle": "applying",
    "FoldHandle": "applying",
    "apply_act": "applying",
    "check_strength": "applying",
    "fold_act": "applying",
    "folded_diffs": "applying",
    "remove_act": "applying",
    "transport": "applying",
    "unfold_act": "applying",
    "ACTError": "errors",
    "ACTInputError": "errors",
    "ACTMapFileError": "errors",
    "ACTModelMismatchError": "errors",
    "ACTWarning": "errors",
    "gaussian_act": "estimators",
    "linear_act": "estimators",
    "mean_act": "estimators",
    "robust_linear_act": "estimators",
    "FitStats": "fitting",
    "fit": "fitting",
    "fit_with_stats": "fitting",
    "ACTMap": "maps",
    "ModuleMap": "maps",
    "ActivationRecorder": "recording",
    "select_modules": "recording",
    "token_mask": "recording",
    "TrajectoryFit": "trajectory",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'act_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
