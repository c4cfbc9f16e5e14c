"""``act_pipeline(pipe)``: an ACT-enabled pipeline of the same class, sharing ``pipe``'s modules."""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..families import family_of_pipeline
from .pipeline import STATEFUL_PARTS, ACTPipelineMixin


def act_pipeline(pipe: Any) -> Any:
    """An ACT-enabled pipeline sharing ``pipe``'s modules (no weights reloaded, dtype kept).

    Built with diffusers' ``from_pipe`` on a subclass that adds ``ACTPipelineMixin`` (with the family of
    ``pipe``'s denoiser, ``act_core.families``) to ``pipe``'s class. The scheduler and tokenizers are
    copied (they keep per-call state, so two pipelines sharing one cannot generate at the same time); the
    models are shared.
    """
    if isinstance(pipe, ACTPipelineMixin):
        return pipe
    cls = type(pipe)
    family = family_of_pipeline(pipe)
    act_cls = type(
        f"ACT{cls.__name__}", (ACTPipelineMixin, cls), {"__module__": __name__, "act_family": family}
    )
    # from_pipe casts every model to ``dtype``, here a no-op; diffusers' modeling_utils then warns about
    # fp32 modules on every such cast, even when there are none ("...kept in float32: []"), so mute it.
    modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = modeling_logger.level
    modeling_logger.setLevel(logging.ERROR)
    try:
        own = {
            name: copy.deepcopy(obj)
            for name in STATEFUL_PARTS
            if (obj := getattr(pipe, name, None)) is not None
        }
        wrapped = act_cls.from_pipe(pipe, dtype=pipe.dtype, **own)
    finally:
        modeling_logger.setLevel(level)
    if hasattr(pipe, "_progress_bar_config"):  # from_pipe does not carry it over
        wrapped.set_progress_bar_config(**pipe._progress_bar_config)
    return wrapped
