"""act_core: Activation Transport (ACT) for any torch model.

Record pooled activations, fit per-unit transport maps, apply them with a strength lambda
through hooks or folded weights, and save them as safetensors. Host-specific code (diffusers,
ComfyUI) lives at the edges; this package imports neither at import time.
"""

__version__ = "0.1.0"
