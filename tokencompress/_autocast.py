"""One answer to "is autocast on for this tensor's device?", safe on every device."""

from __future__ import annotations

import torch

__all__ = ["autocast_active"]


def autocast_active(device_type: str) -> bool:
    """True when autocast is enabled for `device_type`.

    `torch.is_autocast_enabled` raises for device types without autocast, such as `meta`
    (where full-size models are built to count FLOPs); those never autocast.
    """
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
