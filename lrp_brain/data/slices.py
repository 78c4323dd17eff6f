"""What a slice is, whatever the format it was read from: its arrays, label, patient and file."""
from dataclasses import dataclass
from typing import Optional

import numpy as np

#: Class names by 0-based index; the Figshare ``label`` is the index + 1.
CLASS_NAMES = ('meningioma', 'glioma', 'pituitary')


@dataclass(frozen=True, eq=False)
class Slice:
    """One slice as stored in its file, correctly oriented.

    Attributes
    ----------
    image: numpy.ndarray
        (H, W) in the stored dtype (int16 in the Figshare data).
    mask: numpy.ndarray or None
        (H, W) uint8, 1 inside the tumour; ``None`` for an image without a mask (an image folder's may have none).
    label: int
        The 0-based class index into ``class_names`` (Figshare label - 1).
    patient: str
        The patient id (``PID``; an image folder's from its patients CSV, else the image's own file name).
    path: str
        The slice reference it was read from.
    border: numpy.ndarray
        (K, 2) float64, the ``tumorBorder`` points as stored: (x, y) pairs in MATLAB's 1-based pixel coordinates
        (x the column, y the row); (0, 2) where the file has none.
    digest: str
        SHA-1 of the file's bytes; equal digests are the same file twice.
    class_names: tuple of str
        The class names of the dataset (:data:`CLASS_NAMES` for the Figshare set).
    full_scale: float, optional
        The largest value the image's bit depth holds (255 for an 8-bit image, 32767 for the Figshare int16 slices),
        what ``Transform(scaling='fixed')`` divides by; ``None`` for float images.
    """
    image: np.ndarray
    mask: Optional[np.ndarray]
    label: int
    patient: str
    path: str
    border: np.ndarray
    digest: str
    class_names: tuple = CLASS_NAMES
    full_scale: Optional[float] = None

    @property
    def class_name(self):
        return self.class_names[self.label]

    @property
    def size(self):
        """``(H, W)`` of the image."""
        return tuple(self.image.shape)

    @property
    def empty_mask(self):
        """``True`` where the tumour mask holds no pixel (allowed, but the slice has no region to score); ``False``
        where there is no mask at all (see :attr:`has_mask`)."""
        return self.mask is not None and not self.mask.any()

    @property
    def has_mask(self):
        return self.mask is not None

    def info(self):
        """Return the slice's :class:`SliceInfo` (everything but the arrays)."""
        return SliceInfo(self.path, self.label, self.patient, self.size, self.empty_mask, self.digest,
                         self.class_names, self.has_mask)


@dataclass(frozen=True)
class SliceInfo:
    """What a dataset scan keeps of a slice: everything but the arrays (see :class:`Slice`)."""
    path: str
    label: int
    patient: str
    size: tuple
    empty_mask: bool
    digest: str
    class_names: tuple = CLASS_NAMES
    has_mask: bool = True

    @property
    def class_name(self):
        return self.class_names[self.label]
