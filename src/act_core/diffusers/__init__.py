"""The diffusers edge of ACT: the pipeline mixin, local model loading, strength sweeps.

    from act_core.diffusers import act_pipeline
    pipe = act_pipeline(StableDiffusionXLPipeline.from_pretrained(path))
    act_map = pipe.fit_act(source_prompts, target_prompts, num_inference_steps=25, guidance_scale=5.0)
    pipe.enable_act(act_map, strength=1.0)

Importing this package does not import diffusers; the functions that need it do.
"""

from .factory import act_pipeline
from .pipeline import ACTPipelineMixin, active_pipeline

__all__ = ["ACTPipelineMixin", "act_pipeline", "active_pipeline"]
