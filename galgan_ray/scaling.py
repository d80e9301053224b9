"""Arcsinh (Lupton et al. 1999) scaling of images for the networks, with recorded, invertible parameters.

``y = asinh(x / softening) / scale`` and back ``x = softening * sinh(scale * y)``. ``softening`` is in
the image's units (linear below it, logarithmic above), ``scale`` brings bright cores near 1 so a
Tanh output layer can reach them. Works on numpy arrays and torch tensors alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ArcsinhScaling", "scale_images", "unscale_images"]


@dataclass(frozen=True)
class ArcsinhScaling:
    """Parameters of the arcsinh stretch; stored with every shard and checkpoint.

    Attributes
    ----------
    softening : float
        Transition from linear to logarithmic, in image units (for inputs normalised by their
        noise, 1.0 means one noise sigma).
    scale : float
        Divisor of ``asinh`` so that the brightest pixels map near 1.
    """

    softening: float = 1.0
    scale: float = 10.0

    def __post_init__(self):
        if not (self.softening > 0 and self.scale > 0):
            raise ValueError(f"ArcsinhScaling needs softening > 0 and scale > 0, got {self}")

    def forward(self, x):
        """Scaled image ``asinh(x / softening) / scale`` (numpy or torch)."""
        if _is_torch(x):
            return (x / self.softening).asinh() / self.scale
        return np.arcsinh(np.asarray(x) / self.softening) / self.scale

    def inverse(self, y):
        """Linear image from a scaled one (numpy or torch)."""
        if _is_torch(y):
            return self.softening * (self.scale * y).sinh()
        return self.softening * np.sinh(self.scale * np.asarray(y))


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def scale_images(x, scaling: ArcsinhScaling):
    """Apply :meth:`ArcsinhScaling.forward`."""
    return scaling.forward(x)


def unscale_images(y, scaling: ArcsinhScaling):
    """Apply :meth:`ArcsinhScaling.inverse`."""
    return scaling.inverse(y)
