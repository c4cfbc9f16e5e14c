"""How a map transports a module's 4-D (B, C, H, W) outputs: names that map files, presets and hooks share.

``per_element`` maps every element (affine everywhere, so foldable into weights); ``spatial_mean`` (the
reference's choice for UNet feature maps) shifts each channel by what the map does to its spatial mean.
Outputs with units on the last axis, (B, T, C) and (B, C), are mapped per element either way.
"""

APPLY_PER_ELEMENT = "per_element"
APPLY_SPATIAL_MEAN = "spatial_mean"
APPLY_MODES = (APPLY_PER_ELEMENT, APPLY_SPATIAL_MEAN)
