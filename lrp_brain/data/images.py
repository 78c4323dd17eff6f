"""Reading PNG and JPEG images, and datasets of them: a folder with one subfolder per class.

An image folder is laid out as ::

    DATA/glioma/0001.jpg            the images, in a folder named after their class
    DATA/notumor/0002.png
    DATA/masks/glioma/0001.png      optional: tumour masks, under the images' relative names (any image suffix)
    DATA/patients.csv               optional: rows ``file,patient`` (``glioma/0001.jpg,P17``)

An image's class is the name of the folder it is in, so ``DATA/Training/glioma/*.jpg`` and
``DATA/Testing/glioma/*.jpg`` are both glioma: the Training and Testing folders of the public Kaggle sets are pooled
and split as the Figshare slices are (give a split file to keep them apart). The class names are the folder names,
sorted (the class indices Keras' ``flow_from_directory`` and torchvision's ``ImageFolder`` give them).
"""
import csv
import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import ImageOps, JpegImagePlugin, PngImagePlugin

from lrp_brain.data.figshare import MAX_PID_LENGTH
from lrp_brain.data.files import (
    _HEAD_BYTES, MAX_FILE_BYTES, MAX_SIDE, DataError, Problem, _read_at_most, _what_file, natural_key,
    open_regular_file,
)
from lrp_brain.data.slices import Slice

#: Suffixes of the image files read besides Figshare ``.mat`` slices.
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


#: Pillow's readers of the image formats read besides Figshare slices, by their signature. They are called directly
#: rather than through ``Image.open``, whose decompression-bomb check would raise on a huge header before
#: :func:`read_image_file` can refuse it naming its sides.
_IMAGE_READERS = {b'\x89PNG\r\n\x1a\n': ('PNG', PngImagePlugin.PngImageFile),
                  b'\xff\xd8\xff': ('JPEG', JpegImagePlugin.jpeg_factory)}
#: What :func:`read_image_file` expects, for its messages.
_IMAGE_FILE = 'a PNG or JPEG image'
#: Pillow modes whose values are the grey image as stored: 8 bits, 16 bits at their full range (``'I'`` is how
#: older Pillow versions open 16-bit PNGs).
_GREY_MODES = ('L', 'I;16', 'I')
#: The grey modes of 16 bits per pixel.
_SIXTEEN_BIT_MODES = ('I;16', 'I')
#: Pillow modes read as the mean of red, green and blue after Pillow's conversion to RGB (which drops an alpha).
_COLOUR_MODES = ('RGB', 'RGBA', 'P', 'CMYK')
#: What a file of several frames is, by Pillow's format name.
_SEVERAL_FRAMES = {'PNG': 'an animated PNG', 'MPO': 'a multi-picture JPEG'}


def read_image_file(path):
    """Read a PNG or JPEG image as one grey channel: the pixels of :func:`read_image`, without the full scale."""
    return read_image(path)[0]


def read_image(path):
    """Read a PNG or JPEG image as one grey channel, decoded by Pillow according to its mode, with its full scale.

    * Grey (``L``, 16-bit ``I;16``): the values as stored, 16-bit ones at their full range 0 .. 65535; a 1-bit image
      as 0 and 255.
    * Colour (``RGB``), palette (``P``, through its palette) and ``CMYK`` (Pillow's conversion to RGB; the inverted
      CMYK of Adobe JPEGs is undone on reading): the mean of the red, green and blue values, as for RGB before.
    * An alpha channel (``LA``, ``RGBA``, a palette's transparency) is dropped, not composited: the colour under it is
      read as it is.
    * The EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`): the image is read upright, as viewers
      show it, and its shape is the upright one.
    * 16-bit colour PNGs (and 16-bit grey with alpha) come at 8 bits per channel, as Pillow reads them.

    The size comes from the file's header and is checked before a pixel is decoded. A file of several frames (an
    animated PNG, a multi-picture JPEG) is refused, not read as its first frame. A non-square image is returned as it
    is; :class:`Transform` pads it to a square, never stretches it.

    Returns
    -------
    pixels: numpy.ndarray
        ``(H, W)`` float64, in the file's own value range.
    full_scale: float
        The largest value of the image's bit depth: 65535 for a 16-bit grey image, 255 for every other (Pillow reads
        colour at 8 bits per channel); what ``Transform(scaling='fixed')`` divides by.

    Raises
    ------
    DataError
        Naming the file: missing, a folder, FIFO or device, larger than :data:`MAX_FILE_BYTES`, not a PNG or JPEG
        file (saying what it is instead: empty, text, a MAT-file, ...), damaged, of several frames, or with a side
        outside 2 .. :data:`MAX_SIDE`.
    """
    path = os.fspath(path)
    with open_regular_file(path, _IMAGE_FILE) as file:
        size = os.fstat(file.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise DataError(f'file is {size} bytes, more than the {MAX_FILE_BYTES} accepted', path, 'too large')
        head = file.read(_HEAD_BYTES)
        file.seek(0)
        kind, reader = next((found for signature, found in _IMAGE_READERS.items() if head.startswith(signature)),
                            (None, None))
        if reader is None:
            raise DataError(f'cannot be read as an image: it is {_what_file(head)}; expected {_IMAGE_FILE}', path,
                            'not an image')
        try:
            image = reader(file)
            frames, (width, height) = getattr(image, 'n_frames', 1), image.size
            if frames > 1:
                raise DataError(f'holds {frames} frames ({_SEVERAL_FRAMES.get(image.format, image.format)}); '
                                f'expected a single image: save the frame to explain as a file of its own', path,
                                'several frames')
            if not (2 <= width <= MAX_SIDE and 2 <= height <= MAX_SIDE):
                raise DataError(f'image is {width}×{height} pixels; expected sides from 2 to {MAX_SIDE} (refused '
                                f'from its header, before decoding)', path, 'wrong shape')
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, struct.error,
                zlib.error) as error:  # what Pillow raises for damaged files
            # Pillow raises a struct.error of a short read as the cause of a SyntaxError
            reason = 'it ends too early' if isinstance(error.__cause__ or error, (EOFError, struct.error)) else \
                str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f'cannot be read as an image: a damaged {kind} file ({reason})', path,
                            'unreadable image') from None
    if image.mode in ('1', 'LA'):
        image = image.convert('L')
    full_scale = 65535. if image.mode in _SIXTEEN_BIT_MODES else 255.
    if image.mode in _GREY_MODES:
        pixels = np.asarray(image)
    elif image.mode in _COLOUR_MODES:
        pixels = np.asarray(image.convert('RGB')).mean(axis=-1)
    else:
        raise DataError(f'pixel mode {image.mode!r} is not read; expected a grey, colour, palette or CMYK image', path,
                        'unsupported mode')
    return pixels.astype(np.float64), full_scale


# --- image folders ------------------------------------------------------------------------------------------------

#: The folder of an image folder that holds the tumour masks, under the images' relative names.
MASKS_FOLDER = 'masks'
#: The file of an image folder that gives the patient of every image, as CSV rows ``file,patient``.
PATIENTS_FILE = 'patients.csv'
#: What :func:`_read_patients` expects, for its messages.
_PATIENTS_CSV = 'a CSV file with the columns file,patient'


def _image_names(folder, leave_out=()):
    """The image files under ``folder`` as relative names with ``/``, in natural order; hidden entries, macOS
    ``__MACOSX`` folders and the top-level folders ``leave_out`` are left out."""
    names = []
    for current, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith('.') and name != '__MACOSX'
                         and not (current == folder and name in leave_out)]
        names.extend(os.path.relpath(os.path.join(current, name), folder).replace(os.sep, '/') for name in files
                     if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith('.'))
    return sorted(names, key=natural_key)


def is_image_folder(path):
    """Whether ``path`` is a folder of images rather than of Figshare slices: it holds PNG or JPEG files and no
    ``.mat`` file or zip."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    found_image = False
    for _, subfolders, files in os.walk(path):
        subfolders[:] = [name for name in subfolders if not name.startswith('.') and name != '__MACOSX']
        for name in files:
            if name.lower().endswith(('.mat', '.zip')):
                return False
            found_image = found_image or name.lower().endswith(IMAGE_SUFFIXES)
    return found_image


def _read_patients(path):
    """Read a patients CSV: ``{image name relative to the folder: patient id}``, refusing a malformed file with the
    line at fault."""
    with open_regular_file(path, _PATIENTS_CSV) as file:
        data = _read_at_most(file, MAX_FILE_BYTES, path, 'file')
    try:
        rows = list(csv.reader(io.StringIO(data.decode('utf-8-sig'))))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f'cannot be read as {_PATIENTS_CSV} ({error})', path, 'patients file') from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if header != ['file', 'patient']:
        raise DataError(f'the first line is {",".join(rows[0]) if rows else "missing"!r}; expected the header '
                        f'file,patient', path, 'patients file')
    patients = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if len(cells) != 2 or not all(cells) or len(cells[1]) > MAX_PID_LENGTH:
            raise DataError(f'line {line} is {",".join(row)!r}; expected an image name and a patient id of 1 to '
                            f'{MAX_PID_LENGTH} characters', path, 'patients file')
        name = cells[0].replace('\\', '/')
        if name in patients:
            raise DataError(f'line {line} names {name!r} again', path, 'patients file')
        patients[name] = cells[1]
    return patients


def _read_mask(path, shape, ref):
    """Read a mask image for the image ``ref`` of ``shape``: 1 inside the tumour (any value above 0), 0 outside."""
    values, _ = read_image(path)
    if values.shape != shape:
        raise DataError(f'its mask {path} is {values.shape[1]}×{values.shape[0]} pixels but the image is '
                        f'{shape[1]}×{shape[0]}', ref, 'mask shape ≠ image')
    levels = np.unique(values)
    if levels.size > 2 or (levels.size == 2 and levels[0] != 0):
        raise DataError(f'its mask {path} holds {levels.size} values ({", ".join(f"{v:g}" for v in levels[:4])}'
                        f'{", ..." if levels.size > 4 else ""}); expected 0 outside the tumour and one value inside, '
                        f'e.g. 0 and 255 (save masks as PNG: JPEG compression blurs them)', ref, 'invalid values')
    return (values > 0).astype(np.uint8)


def _digest(path):
    """SHA-1 of a file's bytes."""
    with open_regular_file(path, _IMAGE_FILE) as file:
        return hashlib.file_digest(file, 'sha1').hexdigest()


@dataclass(frozen=True)
class ImageFolder:
    """A folder of PNG / JPEG images with one subfolder per class, as a dataset (see the module's description of the
    layout, and :class:`lrp_brain.data.figshare.FigshareDataset` for the interface the two formats share).

    Without :data:`PATIENTS_FILE` every image counts as a patient of its own (its patient id is its relative name):
    a patient-wise split is then a split by file, and slices of one patient may land in train and test.

    Attributes
    ----------
    root: str
        The folder (absolute).
    class_names: tuple of str
        The names of the folders the images are in, sorted.
    images: tuple of str
        The image files, relative to ``root`` with ``/``, in natural order (the masks folder left out).
    masks: dict
        ``{relative name without suffix: mask file relative to the masks folder}``; empty without masks.
    patients: dict or None
        ``{relative name: patient id}`` from :data:`PATIENTS_FILE`; ``None`` without it.
    """
    root: str
    class_names: tuple
    images: tuple
    masks: dict
    patients: Optional[dict]
    mask_field = 'the mask'

    @classmethod
    def open(cls, root):
        """Find the images, classes, masks and patients of the folder ``root``; a malformed patients CSV or two
        masks for one image raise :class:`DataError`."""
        root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(root):
            raise DataError('no such folder', root, 'missing file')
        images = _image_names(root, leave_out=(MASKS_FOLDER,))
        class_names = tuple(sorted({name.split('/')[-2] for name in images if '/' in name}))
        if not class_names:
            raise DataError(f'no images in class subfolders ({os.path.join(root, "<class>", "<image>")} with the '
                            f'suffix {", ".join(IMAGE_SUFFIXES)}) found', root, 'no slices')
        masks = {}
        for name in _image_names(os.path.join(root, MASKS_FOLDER)):
            stem = os.path.splitext(name)[0]
            if stem in masks:
                raise DataError(f'two masks for one image: {masks[stem]} and {name}',
                                os.path.join(root, MASKS_FOLDER), 'duplicate')
            masks[stem] = name
        patients_file = os.path.join(root, PATIENTS_FILE)
        patients = _read_patients(patients_file) if os.path.lexists(patients_file) else None
        return cls(root, class_names, tuple(images), masks, patients)

    @property
    def sources(self):
        return [self.root]

    @property
    def has_patients(self):
        return self.patients is not None

    @property
    def has_masks(self):
        return bool(self.masks)

    def list_files(self):
        """``(refs, problems)``: the images in class folders (absolute paths), and one problem per image outside."""
        refs, problems = [], []
        for name in self.images:
            path = os.path.join(self.root, *name.split('/'))
            if '/' in name:
                refs.append(path)
            else:
                problems.append(Problem(path, 'not in a class subfolder: move it into the folder of its class',
                                        'no class folder'))
        return refs, problems

    def read(self, ref):
        """Read one image of the folder with its class, mask (``None`` where it has none) and patient.

        Raises
        ------
        DataError
            Naming the file: not in a class folder of this dataset, not a readable image (see :func:`read_image`),
            no row in the patients CSV, a mask of another size or with more than two values.
        """
        path = os.path.abspath(os.fspath(ref))
        name = os.path.relpath(path, self.root).replace(os.sep, '/')
        class_name = name.split('/')[-2] if '/' in name else None
        if class_name not in self.class_names or name.startswith('../'):
            raise DataError(f'not in a class folder of {self.root} (classes {", ".join(self.class_names)})', path,
                            'no class folder')
        pixels, full_scale = read_image(path)
        patient = name if self.patients is None else self.patients.get(name)
        if patient is None:
            raise DataError(f'no patient id: {os.path.join(self.root, PATIENTS_FILE)} has no row for {name!r}', path,
                            'missing patient')
        stem = os.path.splitext(name)[0]
        mask = None if stem not in self.masks else \
            _read_mask(os.path.join(self.root, MASKS_FOLDER, *self.masks[stem].split('/')), pixels.shape, path)
        return Slice(pixels, mask, self.class_names.index(class_name), patient, path, np.zeros((0, 2)),
                     _digest(path), self.class_names, full_scale)

    def folds(self):
        """An image folder has no folds of its own: ``None``."""
        return None
