"""The preprocessing between a stored slice and the model's input."""
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
from torch.nn import functional

from lrp_brain.data.files import MAX_SIDE, DataError

@dataclass(frozen=True)
class Transform:
    """The preprocessing between a stored slice and the model's input.

    The image is scaled to ``value_range`` as ``scaling`` says — per image by min–max (``'minmax'``, the project's
    own), or by a fixed divisor as Keras pipelines do (``'fixed'``: value / the full scale of the image's bit depth,
    255 for 8-bit images; or a number: value / that number), then clamped to ``value_range`` — padded to a square if
    it is not one (centred, with ``value_range[0]``, the image's minimum under min–max; never stretched), resized to
    ``size``×``size`` (bilinear with antialiasing, a convex combination of pixels, so values stay in
    ``value_range``), repeated to 3 channels and, if ``mean`` and ``std`` are given, normalised per channel as
    ``(x - mean) / std``. A constant image (max = min) has no range to scale: under min–max it maps to
    ``value_range[0]`` everywhere. The mask is padded (with 0) and resized the same way and binarised at 0.5. With
    ``flips`` (for training) image and mask are flipped left–right together with probability 1/2.

    ``value_range`` (with ``mean``, ``std``) is what :func:`lrp_brain.composites.zbox_bounds` derives the z^B
    bounds from; :meth:`to_dict` is what checkpoints store.

    Attributes
    ----------
    size: int
        The side of the square output (224 by default; the seed study used 256).
    value_range: tuple of float
        ``(low, high)`` that min–max maps to.
    flips: bool
        Random left–right flips.
    mean, std: tuple of float, optional
        Per-channel normalisation after scaling (one value or three).
    scaling: str or float
        ``'minmax'`` (default; what checkpoints without the field used), ``'fixed'`` or a positive divisor.
    """
    size: int = 224
    value_range: tuple = (0., 1.)
    flips: bool = False
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    scaling: object = 'minmax'

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, (int, float, np.number)) or \
                int(self.size) != self.size or not 1 <= self.size <= MAX_SIDE:
            raise DataError(f'transform size must be an integer from 1 to {MAX_SIDE}, got {self.size!r}')
        object.__setattr__(self, 'size', int(self.size))
        try:
            low, high = (float(value) for value in self.value_range)
        except (TypeError, ValueError):
            raise DataError(f'transform value_range must be two numbers (low, high), got {self.value_range!r}') \
                from None
        if not (np.isfinite([low, high]).all() and low < high):
            raise DataError(f'transform value_range must be finite with low < high, got {self.value_range!r}')
        object.__setattr__(self, 'value_range', (low, high))
        object.__setattr__(self, 'flips', bool(self.flips))
        if (self.mean is None) != (self.std is None):
            raise DataError(f'transform needs both mean and std or neither, got mean={self.mean!r}, std={self.std!r}')
        if self.mean is not None:
            try:
                mean, std = (tuple(float(value) for value in np.ravel(item)) for item in (self.mean, self.std))
            except (TypeError, ValueError):
                raise DataError(f'transform mean and std must be numbers, got {self.mean!r}, {self.std!r}') from None
            if not np.isfinite(mean + std).all() or len(mean) not in (1, 3) or len(std) not in (1, 3) or min(std) <= 0:
                raise DataError(f'transform mean and std need 1 or 3 finite values, std > 0; got {mean}, {std}')
            object.__setattr__(self, 'mean', mean)
            object.__setattr__(self, 'std', std)
        if self.scaling not in ('minmax', 'fixed'):
            if isinstance(self.scaling, (bool, str)) or not isinstance(self.scaling, (int, float, np.number)) or \
                    not (np.isfinite(self.scaling) and self.scaling > 0):
                raise DataError(f"transform scaling must be 'minmax', 'fixed' or a positive divisor, got "
                                f"{self.scaling!r}")
            object.__setattr__(self, 'scaling', float(self.scaling))

    def to_dict(self):
        """The transform as a JSON-able dict (lists for tuples); :meth:`from_dict` reads it back. ``scaling`` is only
        recorded where it is not ``'minmax'``, so a min–max transform's dict is the one earlier versions (which
        refuse unknown keys) wrote and read."""
        values = {item.name: getattr(self, item.name) for item in fields(self)
                  if item.name != 'scaling' or self.scaling != 'minmax'}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls, values):
        """Build a transform from :meth:`to_dict`'s output (without ``scaling``: min–max); unknown keys raise
        :class:`DataError`."""
        if not isinstance(values, dict):
            raise DataError(f'transform must be a dict of {sorted(item.name for item in fields(cls))}, got '
                            f'{type(values).__name__} {values!r}')
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f'transform dict has unknown keys {unknown}; known: {sorted(known)}')
        return cls(**values)

    def _resize(self, array, fill):
        # (H, W) -> centred in a square of side max(H, W), the rest `fill` -> (S, S); bilinear with antialias:
        # non-negative weights summing to one
        height, width = array.shape
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        array = functional.pad(array, (left, side - width - left, top, side - height - top), value=fill)
        return functional.interpolate(
            array[None, None], size=(self.size, self.size), mode='bilinear', antialias=True, align_corners=False
        )[0, 0]

    def __call__(self, image, mask=None, generator=None, full_scale=None):
        """Preprocess one slice.

        Parameters
        ----------
        image: array-like
            (H, W) as stored.
        mask: array-like, optional
            (H, W) tumour mask.
        generator: torch.Generator, optional
            The random source of the flips (torch's global one if ``None``).
        full_scale: float, optional
            The largest value of the image's bit depth (:attr:`lrp_brain.data.slices.Slice.full_scale`), which
            ``scaling='fixed'`` divides by; required there.

        Returns
        -------
        image: torch.Tensor
            (3, S, S) float32.
        mask: torch.Tensor or None
            (S, S) float32 of 0 and 1.
        """
        pixels = torch.as_tensor(np.asarray(image, dtype=np.float32))
        if pixels.ndim != 2:
            raise DataError(f'transform expects an (H, W) image, got shape {tuple(pixels.shape)}')
        low, high = self.value_range
        if self.scaling == 'minmax':
            lowest, highest = pixels.min(), pixels.max()
            if highest > lowest:
                pixels = low + (pixels - lowest) / (highest - lowest) * (high - low)
            else:
                pixels = torch.full_like(pixels, low)
        else:
            divisor = full_scale if self.scaling == 'fixed' else self.scaling
            if divisor is None:
                raise DataError("transform scaling 'fixed' divides by the full scale of the image's bit depth, but "
                                "the image has none (a float image): give the divisor as scaling")
            pixels = (low + pixels / float(divisor) * (high - low)).clamp(low, high)
        mask_pixels = None
        if mask is not None:
            mask_pixels = torch.as_tensor(np.asarray(mask, dtype=np.float32))
            if mask_pixels.shape != pixels.shape:
                raise DataError(
                    f'transform: mask shape {tuple(mask_pixels.shape)} ≠ image shape {tuple(pixels.shape)}')
            mask_pixels = (self._resize(mask_pixels, 0.) >= .5).float()
        pixels = self._resize(pixels, low).clamp(low, high)
        if self.flips and torch.rand((), generator=generator) < .5:
            pixels = pixels.flip(-1)
            mask_pixels = mask_pixels.flip(-1) if mask_pixels is not None else None
        channels = pixels.expand(3, -1, -1).clone()
        if self.mean is not None:
            channels = (channels - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)
        return channels, mask_pixels
