"""act_core: Activation Transport (ACT) for any torch model.

Record pooled activations, fit per-unit transport maps, apply them with a strength lambda through
hooks or folded weights, and save them as safetensors. Host-specific code (diffusers, ComfyUI) lives
at the edges; importing this package imports neither.
"""

from ._version import __version__
from .applying import (
    ACTHandle,
    FoldHandle,
    apply_act,
    check_strength,
    fold_act,
    folded_diffs,
    remove_act,
    transport,
    unfold_act,
)
from .errors import ACTError, ACTInputError, ACTMapFileError, ACTModelMismatchError
from .estimators import gaussian_act, linear_act, mean_act
from .fitting import FitStats, fit, fit_with_stats
from .maps import ACTMap, ModuleMap
from .recording import ActivationRecorder, select_modules, token_mask

__all__ = [
    "__version__",
    "ACTError",
    "ACTHandle",
    "ACTInputError",
    "ACTMap",
    "ACTMapFileError",
    "ACTModelMismatchError",
    "ActivationRecorder",
    "FitStats",
    "FoldHandle",
    "ModuleMap",
    "apply_act",
    "check_strength",
    "fit",
    "fit_with_stats",
    "fold_act",
    "folded_diffs",
    "gaussian_act",
    "linear_act",
    "mean_act",
    "remove_act",
    "select_modules",
    "token_mask",
    "transport",
    "unfold_act",
]
