"""Attribution maps at named taps (SPEC section 5): SWA, SSWA masks, EWA, Grad-CAM and map utilities."""

from apjax.attribution.maps import (
    METHODS,
    REDUCTIONS,
    bernoulli_channel_mask,
    channel_weights,
    ewa_map,
    fixed_count_channel_mask,
    gradcam_map,
    map_cosine_similarity,
    normalize_map,
    swa_map,
    tap_maps,
    upsample_map,
)

__all__ = [
    "METHODS",
    "REDUCTIONS",
    "bernoulli_channel_mask",
    "channel_weights",
    "ewa_map",
    "fixed_count_channel_mask",
    "gradcam_map",
    "map_cosine_similarity",
    "normalize_map",
    "swa_map",
    "tap_maps",
    "upsample_map",
]
