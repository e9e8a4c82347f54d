"""Compression losses: attribution matching (SPEC sections 1, 5), logit KD and BCE (SPEC section 4)."""

from apjax.compress.losses import (
    MATCHING_FORMS,
    bce_loss,
    kd_loss,
    matching_loss,
    multi_tap_matching_loss,
)

__all__ = [
    "MATCHING_FORMS",
    "bce_loss",
    "kd_loss",
    "matching_loss",
    "multi_tap_matching_loss",
]
