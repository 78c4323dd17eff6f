"""The Figshare brain-tumour dataset (Cheng et al.): reading slices, preprocessing them and splitting by patient.

The dataset holds 3,064 T1-weighted contrast-enhanced MRI slices of 233 patients, one MATLAB v7.3 file per slice
(``1.mat`` ... ``3064.mat``), either in a folder (the Kaggle copy keeps them in ``dataset/data/``) or in the four
original zips ``brainTumorDataPublic_1-766.zip`` ... ``brainTumorDataPublic_2299-3064.zip``. A MATLAB v7.3 file is
an HDF5 file behind a 512-byte header; each holds a struct ``cjdata`` with the fields

==============  ====================================  =============================================
field           stored as                             meaning
==============  ====================================  =============================================
``image``       int16, 512×512 (some 256×256)         the slice
``tumorMask``   uint8 (MATLAB logical), same shape    1 inside the tumour
``label``       1×1 double                            1 meningioma, 2 glioma, 3 pituitary tumour
``PID``         uint16 character codes (MATLAB char)  patient id, e.g. ``'MR032322C'`` or ``'100360'``
``tumorBorder`` 1×N double                            the outline as x1, y1, x2, y2, ... (as drawn)
==============  ====================================  =============================================

MATLAB stores arrays column-major, so HDF5 (and h5py) sees every array transposed: an H×W MATLAB image is a
(W, H) dataset. The reader transposes back, so ``Slice.image[row, column]`` is MATLAB's ``image(row+1, column+1)``.
``cvind.mat`` (variable ``cvind``: the cross-validation fold, 1 to 5, of every image, patient-wise) may sit beside
the slices.

A slice is named by a *reference*: a file path, or ``'path/to/file.zip::member.mat'`` for a zip member (read into
memory, never unpacked to disk). Every problem with the data raises :class:`DataError` naming the file and field.
"""
import hashlib
import io
import json
import lzma
import math
import os
import re
import stat
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Optional

import h5py
import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

#: Class names by 0-based index; the Figshare ``label`` is the index + 1.
CLASS_NAMES = ('meningioma', 'glioma', 'pituitary')

#: The largest image side accepted (the Figshare slices are 512 or 256 pixels).
MAX_SIDE = 4096
#: The largest file (or zip member) read into memory, in bytes.
MAX_FILE_BYTES = 256 * 2 ** 20
#: Separates a zip file from its member in a slice reference.
ZIP_SEPARATOR = '::'

#: Suffixes of the image files read besides Figshare ``.mat`` slices.
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')

#: The largest array read into memory, in bytes: an image of MAX_SIDE² float64 values.
MAX_ARRAY_BYTES = MAX_SIDE ** 2 * 8
#: The longest patient id accepted, in characters (the Figshare ones have 6 to 12).
MAX_PID_LENGTH = 256

_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
# HDF5 looks for its superblock at offset 0 and at 512, 1024, 2048, ... (MATLAB v7.3 puts it at 512)
_SUPERBLOCK_OFFSETS = (0,) + tuple(512 * 2 ** power for power in range(8))
_SPLIT_FORMAT = 'lrp-brain split'
_SPLIT_PARTS = ('train', 'val', 'test')


class DataError(ValueError):
    """A problem with the data: a file, a field, a split.

    Parameters
    ----------
    reason: str
        What is wrong, naming the field and value.
    ref: str, optional
        The file (slice reference) at fault; the message starts with it.
    kind: str
        A short name of the problem, used to count skipped files by reason, e.g. ``'missing field'``.
    """
    def __init__(self, reason, ref=None, kind='invalid'):
        self.reason, self.ref, self.kind = reason, ref, kind
        super().__init__(f'{ref}: {reason}' if ref is not None else reason)


class PatientLeakageWarning(UserWarning):
    """A split puts slices of one patient into more than one of train, validation and test."""


@dataclass(frozen=True, eq=False)
class Slice:
    """One slice as stored in its file, correctly oriented.

    Attributes
    ----------
    image: numpy.ndarray
        (H, W) in the stored dtype (int16 in the Figshare data).
    mask: numpy.ndarray
        (H, W) uint8, 1 inside the tumour.
    label: int
        The 0-based class index (Figshare label - 1).
    patient: str
        The patient id (``PID``).
    path: str
        The slice reference it was read from.
    border: numpy.ndarray
        (K, 2) float64, the ``tumorBorder`` points as stored: (x, y) pairs in MATLAB's 1-based pixel coordinates
        (x the column, y the row); (0, 2) where the file has none.
    digest: str
        SHA-1 of the file's bytes; equal digests are the same file twice.
    """
    image: np.ndarray
    mask: np.ndarray
    label: int
    patient: str
    path: str
    border: np.ndarray
    digest: str

    @property
    def class_name(self):
        return CLASS_NAMES[self.label]

    @property
    def size(self):
        """``(H, W)`` of the image."""
        return tuple(self.image.shape)

    @property
    def empty_mask(self):
        """``True`` where the tumour mask holds no pixel (allowed, but the slice has no region to score)."""
        return not self.mask.any()

    def info(self):
        """Return the slice's :class:`SliceInfo` (everything but the arrays)."""
        return SliceInfo(self.path, self.label, self.patient, self.size, self.empty_mask, self.digest)


@dataclass(frozen=True)
class SliceInfo:
    """What a dataset scan keeps of a slice: everything but the arrays (see :class:`Slice`)."""
    path: str
    label: int
    patient: str
    size: tuple
    empty_mask: bool
    digest: str

    @property
    def class_name(self):
        return CLASS_NAMES[self.label]


@dataclass(frozen=True)
class Problem:
    """A problem found with one file of a dataset.

    Attributes
    ----------
    ref: str
        The file (slice reference), or ``'patient ID'`` for a finding about a patient.
    reason: str
        What is wrong.
    kind: str
        A short name of the problem (see :class:`DataError`).
    fatal: bool
        ``False`` for findings that are allowed but flagged (an empty mask, a patient with slices of two classes).
    """
    ref: str
    reason: str
    kind: str
    fatal: bool = True

    @property
    def message(self):
        return f'{self.ref}: {self.reason}'

    @classmethod
    def from_error(cls, error):
        return cls(error.ref, error.reason, error.kind)

    def error(self):
        """The problem as a :class:`DataError`."""
        return DataError(self.reason, self.ref, self.kind)


# --- finding slices -----------------------------------------------------------------------------------------------

def natural_key(text):
    """Sort key that orders embedded numbers by value: ``'2.mat'`` before ``'10.mat'``."""
    # re.split with a group alternates text (even positions) and digit runs (odd positions)
    return [int(part) if position % 2 else part for position, part in enumerate(re.split('([0-9]+)', str(text)))]


def _is_slice_name(name):
    base = os.path.basename(name)
    return (
        base.lower().endswith('.mat') and base.lower() != 'cvind.mat' and not base.startswith('._')
        and '__MACOSX' not in name.split('/')
    )


def _regular_file_size(path, ref):
    """Return the size of the file ``path`` in bytes; refuse a folder, pipe or device (reading one may never end)."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise DataError('not a regular file (a folder, pipe or device); refused', ref, 'not a file')
    return status.st_size


def _zip_members(zip_path, wanted):
    """Return ``(members, problems)``: the zip's members for which ``wanted(name)`` holds, in natural order."""
    try:
        _regular_file_size(zip_path, zip_path)
        with zipfile.ZipFile(zip_path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except DataError as error:
        return [], [Problem.from_error(error)]
    except (zipfile.BadZipFile, OSError, RuntimeError) as error:
        return [], [Problem(zip_path, f'not a readable zip file ({error})', 'unreadable zip')]
    members, problems = [], []
    for name in sorted(names, key=natural_key):
        if not wanted(name):
            continue
        parts = name.replace('\\', '/').split('/')
        if name.startswith(('/', '\\')) or '..' in parts or ':' in parts[0]:
            ref = f'{zip_path}{ZIP_SEPARATOR}{name}'
            problems.append(Problem(ref, 'member name would escape the zip folder; refused', 'unsafe name'))
            continue
        members.append(name)
    return members, problems


def _sources(source):
    if isinstance(source, (str, os.PathLike)):
        return [os.path.abspath(os.fspath(source))]
    return [os.path.abspath(os.fspath(item)) for item in source]


def dataset_root(source):
    """The folder that slice references of ``source`` are stored relative to in a split file.

    A folder is its own root; a file or zip's root is its folder; several sources share their common folder.
    """
    roots = [path if os.path.isdir(path) else os.path.dirname(path) for path in _sources(source)]
    return os.path.commonpath(roots)


def _list_files(source, wanted):
    """Return ``(refs, problems)``: files and zip members of ``source`` for which ``wanted(name)`` holds."""
    refs, problems = [], []
    for path in _sources(source):
        if os.path.isdir(path):
            candidates = []
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = [name for name in subfolders if not name.startswith('.') and name != '__MACOSX']
                candidates.extend(os.path.join(folder, name) for name in files)
        elif os.path.isfile(path):
            candidates = [path]
        else:
            raise DataError('no such file or folder', path, 'missing file')
        for candidate in sorted(candidates, key=natural_key):
            if candidate.lower().endswith('.zip'):
                members, zip_problems = _zip_members(candidate, wanted)
                refs.extend(f'{candidate}{ZIP_SEPARATOR}{member}' for member in members)
                problems.extend(zip_problems)
            elif wanted(candidate.replace(os.sep, '/')):
                refs.append(candidate)
    return refs, problems


def _list_slices(source):
    """Return ``(refs, problems)`` of a source; a second file with the same name as an earlier one is a problem."""
    refs, problems = _list_files(source, _is_slice_name)
    first_by_name, unique = {}, []
    for ref in sorted(refs, key=natural_key):
        name = os.path.basename(ref.split(ZIP_SEPARATOR)[-1])
        if name in first_by_name:
            problems.append(Problem(ref, f'duplicate file: same name as {first_by_name[name]}', 'duplicate'))
        else:
            first_by_name[name] = ref
            unique.append(ref)
    if not unique and not problems:
        raise DataError('no slice files (*.mat, or zips of them) found', ', '.join(_sources(source)), 'no slices')
    return unique, problems


def find_slices(source, skip_bad=False):
    """List the slice files of a dataset, in natural order (``1.mat``, ``2.mat``, ..., ``10.mat``).

    Parameters
    ----------
    source: str, os.PathLike or list of them
        A ``.mat`` file, a zip of them, or a folder searched recursively for both (``cvind.mat``, hidden folders and
        macOS ``__MACOSX`` / ``._*`` entries are left out).
    skip_bad: bool
        If ``False``, an unreadable zip, a zip member whose name would escape its folder or a second file with the
        name of an earlier one raises :class:`DataError`; if ``True`` they are left out with a warning.

    Returns
    -------
    list of str
        Slice references: absolute file paths, or ``'archive.zip::member.mat'`` for zip members.
    """
    refs, problems = _list_slices(source)
    if problems and not skip_bad:
        raise problems[0].error()
    for problem in problems:
        warnings.warn(f'skipped {problem.message}')
    return refs


# --- reading one file ---------------------------------------------------------------------------------------------

def _read_bytes(ref):
    zip_path, separator, member = str(ref).partition(ZIP_SEPARATOR)
    try:
        size = _regular_file_size(zip_path, ref)
        if not separator:
            if size > MAX_FILE_BYTES:
                raise DataError(f'file is {size} bytes, more than the {MAX_FILE_BYTES} accepted', ref, 'too large')
            with open(zip_path, 'rb') as file:
                return file.read()
        with zipfile.ZipFile(zip_path) as archive:
            info = archive.getinfo(member)
            if info.file_size > MAX_FILE_BYTES:
                raise DataError(
                    f'zip member is {info.file_size} bytes, more than the {MAX_FILE_BYTES} accepted', ref, 'too large'
                )
            return archive.read(info)
    except FileNotFoundError as error:
        raise DataError('no such file', ref, 'missing file') from error
    except KeyError as error:
        raise DataError(f'the zip has no member {member!r}', ref, 'missing file') from error
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise DataError(f'cannot be read ({error})', ref, 'truncated or corrupt') from error


def _check_signature(data, ref):
    """Refuse anything that is not an HDF5 file, telling a MATLAB v5 file (and a damaged v7.3 one) apart."""
    if any(data[offset:offset + 8] == _HDF5_SIGNATURE for offset in _SUPERBLOCK_OFFSETS):
        return
    if not data:
        raise DataError('empty file (0 bytes)', ref, 'truncated or corrupt')
    if data.startswith(b'MATLAB'):
        header = data[:116].split(b',')[0].decode('ascii', 'replace')
        if b'7.3' in data[:20]:
            raise DataError(f'{header!r} header but no HDF5 data: truncated or corrupt file', ref,
                            'truncated or corrupt')
        raise DataError(
            f'{header!r}: a MATLAB v5 (or older) MAT-file, not v7.3 (HDF5); the Figshare slices are v7.3 files '
            f'(re-save it in MATLAB with save(name, "cjdata", "-v7.3"))', ref, 'MATLAB v5 MAT-file'
        )
    raise DataError('not a MATLAB v7.3 MAT-file (no MATLAB header or HDF5 signature)', ref, 'not a MAT-file')


@contextmanager
def _open_mat(ref):
    """Open a MATLAB v7.3 file (or zip member) from memory; yield ``(h5py.File, digest)``.

    Every h5py / HDF5 failure inside the ``with`` body becomes a :class:`DataError` naming the file.
    """
    data = _read_bytes(ref)
    _check_signature(data, ref)
    digest = hashlib.sha1(data).hexdigest()
    try:
        with h5py.File(io.BytesIO(data), 'r') as file:
            yield file, digest
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as error:
        raise DataError(f'truncated or corrupt HDF5 file ({error})', ref, 'truncated or corrupt') from error


def _listed(names, count=10):
    """``names`` sorted, as a list for a message: the first ``count`` of them, ``...`` for the rest."""
    names = sorted(names)
    return '[' + ', '.join(map(repr, names[:count])) + (', ...]' if len(names) > count else ']')


def _member(group, name, where, ref):
    """Return ``group[name]``, or ``None`` where there is no such link; refuse a link into another file."""
    key = name.encode()
    if not group.id.links.exists(key):
        return None
    if group.id.links.get_info(key).type == h5py.h5l.TYPE_EXTERNAL:
        raise DataError(f'{name!r} in {where} is a link into another file; refused', ref, 'external data')
    return group[name]


def _dataset(group, name, where, ref):
    node = _member(group, name, where, ref)
    if node is None:
        raise DataError(f'{where} has no field {name!r} (it has {_listed(group)})', ref, 'missing field')
    if not isinstance(node, h5py.Dataset):
        raise DataError(f'{where}.{name} is a {type(node).__name__}, not an array', ref, 'wrong dtype')
    return node


def _dtype_in_words(dtype):
    """The dtype of a dataset for a message; object dtypes say what they hold."""
    if h5py.check_ref_dtype(dtype) is not None:
        return 'object references (a MATLAB cell array?)'
    if dtype.kind == 'O' and h5py.check_string_dtype(dtype) is None:
        return f'variable-length arrays of {h5py.check_vlen_dtype(dtype)}'
    return str(dtype)


def _is_matlab_empty(node, name, ref):
    """Whether MATLAB flagged the array as empty (it then stores the array's dimensions instead of values)."""
    flag = np.asarray(node.attrs.get('MATLAB_empty', 0))
    if flag.size != 1 or flag.dtype.kind not in 'biu':
        raise DataError(f'{name} has the attribute MATLAB_empty = {flag.tolist()!r}; expected 0 or 1', ref,
                        'wrong dtype')
    return bool(flag.item())


def _check_stored(node, name, ref):
    """Refuse a dataset whose values the file itself does not hold, before reading it.

    Values kept in other files (external storage, a virtual dataset) would be read from wherever those point. Values
    never written read as the fill value, so a file of a few bytes could declare an image of any size. MATLAB writes
    every value; chunked datasets must store every chunk, others their whole size.
    """
    if node.is_virtual or node.external:
        raise DataError(f'{name} keeps its values in another file; refused', ref, 'external data')
    count = math.prod(node.shape)
    if count * node.dtype.itemsize > MAX_ARRAY_BYTES:
        raise DataError(f'{name} would take {count * node.dtype.itemsize} bytes in memory, more than the '
                        f'{MAX_ARRAY_BYTES} accepted', ref, 'too large')
    if node.chunks is not None:
        unit = 'chunks'
        declared = math.prod(math.ceil(side / chunk) for side, chunk in zip(node.shape, node.chunks))
        stored = node.id.get_num_chunks()
    else:
        unit, declared, stored = 'bytes', count * node.dtype.itemsize, node.id.get_storage_size()
    if stored < declared:
        raise DataError(f'{name} of shape {node.shape[::-1]} is not all in the file: {stored} of its {declared} {unit} '
                        f'are stored', ref, 'truncated or corrupt')


def _read_array(node, name, ref, kinds, max_length=None):
    """Read a MATLAB array from its HDF5 dataset, checking dtype, shape and storage before reading; return it
    transposed.

    ``kinds`` are the accepted numpy dtype kinds. With ``max_length`` the array is a vector of at most that many
    values, returned flattened; without, a 2-D image with sides from 2 to :data:`MAX_SIDE`.
    """
    expected = {'i': 'integer', 'u': 'unsigned integer', 'f': 'float', 'b': 'logical', 'S': 'bytes', 'O': 'string'}
    dtype = node.dtype
    if dtype.kind not in kinds or dtype.names is not None or (dtype.kind == 'O' and not h5py.check_string_dtype(dtype)):
        accepted = ', '.join(expected[kind] for kind in kinds)
        raise DataError(f'{name} has dtype {_dtype_in_words(dtype)}; expected {accepted}', ref, 'wrong dtype')
    if _is_matlab_empty(node, name, ref):
        # MATLAB stores an empty array as its dimensions, flagged with MATLAB_empty
        if max_length is None:
            raise DataError(f'{name} is empty', ref, 'wrong shape')
        return np.zeros(0, dtype=dtype)
    shape = node.shape
    if shape is None:
        raise DataError(f'{name} has no values (an HDF5 null dataspace)', ref, 'wrong shape')
    if len(shape) != 2:
        raise DataError(f'{name} has {len(shape)} dimensions {shape}; expected 2', ref, 'wrong shape')
    if max_length is not None:
        if min(shape) > 1:
            raise DataError(f'{name} has shape {shape[::-1]}; expected a vector', ref, 'wrong shape')
        if max(shape) > max_length:
            raise DataError(f'{name} has {max(shape)} values; expected at most {max_length}', ref, 'wrong shape')
    elif not all(2 <= side <= MAX_SIDE for side in shape):
        raise DataError(
            f'{name} has shape {shape[::-1]}; expected a 2-D image with sides from 2 to {MAX_SIDE}', ref, 'wrong shape'
        )
    _check_stored(node, name, ref)
    values = np.asarray(node[()])
    return values.reshape(-1) if max_length is not None else np.ascontiguousarray(values.T)


def _decode_text(codes, name, ref):
    """Decode a MATLAB char array (UTF-16 code units, either orientation) or an HDF5 string."""
    if codes.dtype.kind in 'SO':
        items = [item.decode('utf-8', 'replace') if isinstance(item, bytes) else str(item) for item in codes]
        return ''.join(items).strip()
    if codes.size and (codes.min() < 0 or codes.max() > 0x10FFFF):
        raise DataError(f'{name} holds character codes outside unicode: {codes.min()} .. {codes.max()}', ref,
                        'wrong dtype')
    text = ''.join(chr(int(code)) for code in codes)
    try:
        # a character beyond U+FFFF is a pair of surrogate codes in UTF-16; joined here, a lone one refused
        text = text.encode('utf-16-le', 'surrogatepass').decode('utf-16-le')
    except UnicodeDecodeError:
        raise DataError(f'{name} holds UTF-16 surrogate codes that pair into no character', ref,
                        'invalid values') from None
    return text.strip('\x00 \t\r\n')


def _slice_from_file(file, ref, digest):
    struct = _member(file, 'cjdata', 'the file', ref)
    if struct is None:
        raise DataError(f"no 'cjdata' struct (top-level names: {_listed(file)})", ref, 'missing field')
    if not isinstance(struct, h5py.Group):
        raise DataError("'cjdata' is not a struct", ref, 'wrong dtype')
    nodes = {name: _dataset(struct, name, 'cjdata', ref) for name in ('image', 'tumorMask', 'label', 'PID')}

    image = _read_array(nodes['image'], 'cjdata.image', ref, 'iuf')
    if image.dtype.kind == 'f' and not np.isfinite(image).all():
        raise DataError('cjdata.image holds NaN or infinite values', ref, 'invalid values')

    mask = _read_array(nodes['tumorMask'], 'cjdata.tumorMask', ref, 'buif')
    if mask.shape != image.shape:
        raise DataError(
            f'cjdata.tumorMask has shape {mask.shape} but cjdata.image has {image.shape}', ref, 'mask shape ≠ image'
        )
    if np.any((mask != 0) & (mask != 1)):
        found = np.unique(mask[(mask != 0) & (mask != 1)])[:5].tolist()
        raise DataError(f'cjdata.tumorMask holds values other than 0 and 1: {found}', ref, 'invalid values')
    mask = (mask != 0).astype(np.uint8)

    label_values = _read_array(nodes['label'], 'cjdata.label', ref, 'iuf', max_length=1)
    if label_values.size != 1:
        raise DataError(f'cjdata.label has {label_values.size} values; expected one', ref, 'wrong shape')
    label = label_values[0]
    if label not in (1, 2, 3):
        raise DataError(f'cjdata.label is {float(label):g}; expected 1, 2 or 3', ref, 'label outside {1, 2, 3}')

    pid_codes = _read_array(nodes['PID'], 'cjdata.PID', ref, 'iuSO', max_length=MAX_PID_LENGTH)
    patient = _decode_text(pid_codes, 'cjdata.PID', ref)
    if not patient:
        raise DataError('cjdata.PID is empty', ref, 'empty PID')

    border = np.zeros((0, 2))
    if struct.id.links.exists(b'tumorBorder'):
        values = _read_array(_dataset(struct, 'tumorBorder', 'cjdata', ref), 'cjdata.tumorBorder', ref, 'iuf',
                             max_length=MAX_SIDE ** 2)
        if values.size % 2:
            raise DataError(f'cjdata.tumorBorder has {values.size} values; expected x, y pairs', ref, 'wrong shape')
        border = values.astype(np.float64).reshape(-1, 2)
    return Slice(image, mask, int(label) - 1, patient, str(ref), border, digest)


def read_slice(ref):
    """Read one slice of the Figshare format.

    Parameters
    ----------
    ref: str or os.PathLike
        A ``.mat`` file or a zip member as ``'archive.zip::member.mat'`` (see :func:`find_slices`).

    Returns
    -------
    Slice
        The arrays correctly oriented (transposed back from HDF5's view) with label, patient and outline.

    Raises
    ------
    DataError
        For anything wrong with the file, naming it and the field: not a regular file, larger than
        :data:`MAX_FILE_BYTES`, not HDF5 (a MATLAB v5 file says so), truncated or corrupt, no ``cjdata`` or a missing
        field, a wrong dtype or rank, an image side above :data:`MAX_SIDE`, an array above :data:`MAX_ARRAY_BYTES`
        or a ``PID`` above :data:`MAX_PID_LENGTH` characters, values the file does not hold (never written, or in
        another file through external storage or links), a mask whose shape differs from the image's or holds
        values other than 0 and 1, a label outside {1, 2, 3}, an empty ``PID``. Sizes are checked before anything
        is read. An empty mask is allowed (see :attr:`Slice.empty_mask`).
    """
    ref = os.fspath(ref)
    with _open_mat(ref) as (file, digest):
        return _slice_from_file(file, ref, digest)


def read_image_file(path):
    """Read a PNG or JPEG image as one grey channel, the mean of its colour channels (an alpha channel is dropped).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float64, in the file's own value range.

    Raises
    ------
    DataError
        Naming the file: missing, unreadable, or not a 2-D grey or colour image with sides of 2 to ``MAX_SIDE``.
    """
    from skimage.io import imread

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError('no such file', path, 'missing file')
    try:
        pixels = np.asarray(imread(path))
    except (OSError, ValueError, SyntaxError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f'cannot be read as an image ({reason})', path, 'unreadable image') from None
    if pixels.ndim == 3 and pixels.shape[-1] in (2, 4):
        pixels = pixels[..., :-1]  # grey + alpha, RGB + alpha
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3):
        pixels = pixels.mean(axis=-1)
    if pixels.ndim != 2 or not all(2 <= side <= MAX_SIDE for side in pixels.shape):
        raise DataError(f'image has shape {pixels.shape}; expected a grey or colour image with sides from 2 to '
                        f'{MAX_SIDE}', path, 'wrong shape')
    if not np.isfinite(pixels).all():
        raise DataError('image holds NaN or infinite values', path, 'invalid values')
    return pixels.astype(np.float64)


# --- scanning a dataset -------------------------------------------------------------------------------------------

@dataclass
class Scan:
    """Every slice of a dataset read once: what was readable and what was wrong.

    Attributes
    ----------
    root: str
        The dataset root (see :func:`dataset_root`).
    slices: list of SliceInfo
        The readable slices, in natural order, duplicates left out.
    problems: list of Problem
        Files left out (``fatal``) and findings that are only flagged (empty masks, patients with two classes).
    """
    root: str
    slices: list
    problems: list

    @property
    def skipped(self):
        """The problems that left a file out."""
        return [problem for problem in self.problems if problem.fatal]


def scan(source, skip_bad=False, quiet=False):
    """Read every slice of a dataset once, checking it.

    Parameters
    ----------
    source: str, os.PathLike or list of them
        See :func:`find_slices`.
    skip_bad: bool
        If ``False`` the first bad file raises its :class:`DataError`; if ``True`` bad files are left out and
        recorded in :attr:`Scan.problems`.
    quiet: bool
        Hide the progress bar.

    Returns
    -------
    Scan
        Besides the files that cannot be read, a file with the same bytes as an earlier one is a (fatal) duplicate;
        slices with an empty mask and patients whose slices carry different labels are flagged (not fatal).
    """
    refs, problems = _list_slices(source)
    if problems and not skip_bad:
        raise problems[0].error()
    slices, first_by_digest = [], {}
    for ref in tqdm(refs, desc='reading slices', unit='slice', disable=quiet):
        try:
            info = read_slice(ref).info()
        except DataError as error:
            if not skip_bad:
                raise
            problems.append(Problem.from_error(error))
            continue
        if info.digest in first_by_digest:
            error = DataError(f'duplicate file: the same bytes as {first_by_digest[info.digest]}', ref, 'duplicate')
            if not skip_bad:
                raise error
            problems.append(Problem.from_error(error))
            continue
        first_by_digest[info.digest] = ref
        slices.append(info)
        if info.empty_mask:
            problems.append(Problem(ref, 'cjdata.tumorMask is empty (allowed)', 'empty mask', fatal=False))
    labels_by_patient = defaultdict(set)
    for info in slices:
        labels_by_patient[info.patient].add(info.class_name)
    for patient, names in sorted(labels_by_patient.items(), key=lambda item: natural_key(item[0])):
        if len(names) > 1:
            problems.append(Problem(
                f'patient {patient}', f'slices of {len(names)} classes ({", ".join(sorted(names))})',
                'patient with several classes', fatal=False,
            ))
    return Scan(dataset_root(source), slices, problems)


def summarise_problems(problems):
    """One line counting problems by kind, e.g. ``'3 files: 2 not a MAT-file, 1 label outside {1, 2, 3}'``."""
    counts = Counter(problem.kind for problem in problems)
    details = ', '.join(f'{count} {kind}' for kind, count in counts.most_common())
    return f'{len(problems)} file{"s" if len(problems) != 1 else ""}' + (f': {details}' if details else '')


# --- preprocessing ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transform:
    """The preprocessing between a stored slice and the model's input.

    The image is scaled per image by min–max to ``value_range``, resized to ``size``×``size`` (bilinear with
    antialiasing, a convex combination of pixels, so values stay in ``value_range``), repeated to 3 channels and,
    if ``mean`` and ``std`` are given, normalised per channel as ``(x - mean) / std``. A constant image (max = min)
    has no range to scale: it maps to ``value_range[0]`` everywhere. The mask is resized the same way and binarised
    at 0.5. With ``flips`` (for training) image and mask are flipped left–right together with probability 1/2.

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
    """
    size: int = 224
    value_range: tuple = (0., 1.)
    flips: bool = False
    mean: Optional[tuple] = None
    std: Optional[tuple] = None

    def __post_init__(self):
        if isinstance(self.size, bool) or int(self.size) != self.size or not 1 <= self.size <= MAX_SIDE:
            raise DataError(f'transform size must be an integer from 1 to {MAX_SIDE}, got {self.size!r}')
        object.__setattr__(self, 'size', int(self.size))
        low, high = (float(value) for value in self.value_range)
        if not (np.isfinite([low, high]).all() and low < high):
            raise DataError(f'transform value_range must be finite with low < high, got {self.value_range!r}')
        object.__setattr__(self, 'value_range', (low, high))
        object.__setattr__(self, 'flips', bool(self.flips))
        if (self.mean is None) != (self.std is None):
            raise DataError(f'transform needs both mean and std or neither, got mean={self.mean!r}, std={self.std!r}')
        if self.mean is not None:
            mean, std = (tuple(float(value) for value in np.ravel(item)) for item in (self.mean, self.std))
            if len(mean) not in (1, 3) or len(std) not in (1, 3) or min(std) <= 0:
                raise DataError(f'transform mean and std need 1 or 3 values, std > 0; got {mean}, {std}')
            object.__setattr__(self, 'mean', mean)
            object.__setattr__(self, 'std', std)

    def to_dict(self):
        """The transform as a JSON-able dict (lists for tuples); :meth:`from_dict` reads it back."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls, values):
        """Build a transform from :meth:`to_dict`'s output; unknown keys raise :class:`DataError`."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f'transform dict has unknown keys {unknown}; known: {sorted(known)}')
        return cls(**values)

    def _resize(self, array):
        # (H, W) -> (S, S); bilinear with antialias: non-negative weights summing to one
        return functional.interpolate(
            array[None, None], size=(self.size, self.size), mode='bilinear', antialias=True, align_corners=False
        )[0, 0]

    def __call__(self, image, mask=None, generator=None):
        """Preprocess one slice.

        Parameters
        ----------
        image: array-like
            (H, W) as stored.
        mask: array-like, optional
            (H, W) tumour mask.
        generator: torch.Generator, optional
            The random source of the flips (torch's global one if ``None``).

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
        lowest, highest = pixels.min(), pixels.max()
        if highest > lowest:
            pixels = low + (pixels - lowest) / (highest - lowest) * (high - low)
        else:
            pixels = torch.full_like(pixels, low)
        mask_pixels = None
        if mask is not None:
            mask_pixels = torch.as_tensor(np.asarray(mask, dtype=np.float32))
            if mask_pixels.shape != pixels.shape:
                raise DataError(
                    f'transform: mask shape {tuple(mask_pixels.shape)} ≠ image shape {tuple(pixels.shape)}')
            mask_pixels = (self._resize(mask_pixels) >= .5).float()
        pixels = self._resize(pixels).clamp(low, high)
        if self.flips and torch.rand((), generator=generator) < .5:
            pixels = pixels.flip(-1)
            mask_pixels = mask_pixels.flip(-1) if mask_pixels is not None else None
        channels = pixels.expand(3, -1, -1).clone()
        if self.mean is not None:
            channels = (channels - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)
        return channels, mask_pixels


class SliceDataset(torch.utils.data.Dataset):
    """A torch dataset of slices, read lazily from disk and preprocessed by a :class:`Transform`.

    Parameters
    ----------
    refs: list of str
        Slice references (see :func:`find_slices`, :class:`Split`).
    transform: Transform
        The preprocessing.

    Items are dicts: ``'image'`` (3, S, S) float32, ``'mask'`` (S, S) float32, ``'label'`` int, ``'patient'`` str,
    ``'path'`` str (the reference) and ``'index'`` int (the position in ``refs``). A bad file raises
    :class:`DataError` when its item is read.
    """
    def __init__(self, refs, transform=None):
        self.refs = [os.fspath(ref) for ref in refs]
        self.transform = transform if transform is not None else Transform()

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, index):
        item = read_slice(self.refs[index])
        image, mask = self.transform(item.image, item.mask)
        return {'image': image, 'mask': mask, 'label': item.label, 'patient': item.patient, 'path': item.path,
                'index': index}


# --- splits -------------------------------------------------------------------------------------------------------

def relative_ref(ref, root):
    """A slice reference relative to ``root``, with ``/`` separators (how split files store it)."""
    path, separator, member = os.fspath(ref).partition(ZIP_SEPARATOR)
    return os.path.relpath(path, root).replace(os.sep, '/') + separator + member


def absolute_ref(ref, root):
    """Undo :func:`relative_ref`."""
    path, separator, member = ref.partition(ZIP_SEPARATOR)
    return os.path.normpath(os.path.join(root, *path.split('/'))) + separator + member


def image_number(ref):
    """The image number in a Figshare file name (``'.../123.mat'`` → 123), which indexes ``cvind``."""
    stem = os.path.splitext(os.path.basename(os.fspath(ref).split(ZIP_SEPARATOR)[-1]))[0]
    if not re.fullmatch('[0-9]+', stem):
        raise DataError('file name is not an image number (1.mat, 2.mat, ...), needed to look up cvind', ref, 'name')
    return int(stem)


def find_cvind(source):
    """Return the reference of the first ``cvind.mat`` in ``source`` (or beside a file or zip source), or ``None``."""
    paths = _sources(source)
    refs, _ = _list_files(paths, lambda name: os.path.basename(name).lower() == 'cvind.mat')
    beside = [os.path.join(os.path.dirname(path), 'cvind.mat') for path in paths if os.path.isfile(path)]
    refs.extend(path for path in beside if os.path.isfile(path) and path not in refs)
    return refs[0] if refs else None


def read_cvind(ref):
    """Read ``cvind.mat``: the patient-wise cross-validation fold of every image.

    Returns
    -------
    numpy.ndarray
        (N,) int64; entry ``i - 1`` is the fold of image ``i.mat``.
    """
    ref = os.fspath(ref)
    with _open_mat(ref) as (file, _):
        folds = _read_array(_dataset(file, 'cvind', 'the file', ref), 'cvind', ref, 'iuf', max_length=MAX_SIDE ** 2)
    if folds.size == 0 or not np.all(np.mod(folds, 1) == 0) or folds.min() < 1:
        raise DataError('cvind must hold positive integer fold numbers', ref, 'invalid values')
    return folds.astype(np.int64)


@dataclass
class Split:
    """Which slices train, validate and test a model.

    In memory ``train``, ``val`` and ``test`` hold absolute slice references (ready for :class:`SliceDataset`);
    :meth:`save` stores them relative to ``root`` so the file is portable, and :meth:`load` resolves them against a
    root given there (or the one recorded).

    Attributes
    ----------
    train, val, test: list of str
        Slice references.
    method: str
        ``'patient'``, ``'cvind'`` or ``'random'`` (see :func:`make_split`).
    seed: int
        The seed of the random choices.
    fractions: tuple of float
        The train/val/test fractions asked for (``cvind`` takes whole folds instead).
    root: str
        The dataset root the references are relative to in the file.
    folds: dict, optional
        For ``cvind``: ``{'test': fold, 'val': fold}``.
    skipped: list of list
        ``[reference, reason]`` of the files left out as bad when the split was made.
    """
    train: list
    val: list
    test: list
    method: str
    seed: int
    fractions: tuple
    root: str
    folds: Optional[dict] = None
    skipped: list = field(default_factory=list)

    def parts(self):
        """``{'train': [...], 'val': [...], 'test': [...]}``."""
        return {name: getattr(self, name) for name in _SPLIT_PARTS}

    def save(self, path):
        """Write the split as JSON (atomically: a temporary file renamed into place)."""
        document = {
            'format': _SPLIT_FORMAT, 'version': 1, 'method': self.method, 'seed': self.seed,
            'fractions': list(self.fractions), 'folds': self.folds, 'root': self.root,
            'skipped': [[relative_ref(ref, self.root), reason] for ref, reason in self.skipped],
            **{name: [relative_ref(ref, self.root) for ref in refs] for name, refs in self.parts().items()},
        }
        path = os.fspath(path)
        temporary = f'{path}.tmp{os.getpid()}'
        with open(temporary, 'w') as file:
            json.dump(document, file, indent=1)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path, root=None):
        """Read a split written by :meth:`save`; references are resolved against ``root`` (default: the recorded
        one). Raises :class:`DataError` naming the file and field for anything malformed."""
        path = os.fspath(path)
        try:
            with open(path) as file:
                document = json.load(file)
        except (OSError, ValueError) as error:
            raise DataError(f'cannot read split file ({error})', path, 'split file') from error
        if not isinstance(document, dict) or document.get('format') != _SPLIT_FORMAT:
            raise DataError(f'not an lrp-brain split file (no "format": "{_SPLIT_FORMAT}")', path, 'split file')
        root = os.path.abspath(os.fspath(root)) if root is not None else document.get('root')
        if not isinstance(root, str):
            raise DataError('no "root" recorded: pass the dataset folder', path, 'split file')
        parts = {}
        for name in _SPLIT_PARTS:
            refs = document.get(name)
            if not isinstance(refs, list) or not all(isinstance(ref, str) for ref in refs):
                raise DataError(f'field {name!r} must be a list of file names', path, 'split file')
            parts[name] = [absolute_ref(ref, root) for ref in refs]
        counts = Counter(ref for refs in parts.values() for ref in refs)
        repeated = [ref for ref, count in counts.items() if count > 1]
        if repeated:
            raise DataError(f'{len(repeated)} files are in more than one part, e.g. {repeated[0]}', path, 'split file')
        try:
            return cls(
                **parts, method=str(document['method']), seed=int(document['seed']),
                fractions=tuple(float(value) for value in document['fractions']), root=root,
                folds=document.get('folds'),
                skipped=[[absolute_ref(ref, root), str(reason)] for ref, reason in document.get('skipped', [])],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f'malformed field ({error!r})', path, 'split file') from error


def _check_fractions(fractions):
    fractions = tuple(float(value) for value in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f'split fractions must be 3 non-negative numbers summing to 1 with train > 0, got {fractions}')
    return fractions


def _patient_split(infos, fractions, rng):
    """Assign whole patients to train/val/test, stratified by class, aiming at ``fractions`` of each class's slices.

    Per class the patients (class = their most frequent label) are shuffled and each goes to the part furthest below
    its target in relative terms, ``1 - count / target``; ties go to train, then val, then test. The first three
    patients of a class thus go to train, val and test, and later ones keep the parts close to their targets.
    """
    slices_by_patient = defaultdict(list)
    for info in infos:
        slices_by_patient[info.patient].append(info)
    patients_by_class = defaultdict(list)
    for patient in sorted(slices_by_patient, key=natural_key):
        labels = Counter(info.label for info in slices_by_patient[patient])
        patients_by_class[min(labels, key=lambda label: (-labels[label], label))].append(patient)
    parts = {name: [] for name in _SPLIT_PARTS}
    for label in sorted(patients_by_class):
        patients = patients_by_class[label]
        total = sum(len(slices_by_patient[patient]) for patient in patients)
        targets = [fraction * total for fraction in fractions]
        counts = [0, 0, 0]
        for position in rng.permutation(len(patients)):
            patient = patients[position]
            deficits = [1 - count / target if target > 0 else -np.inf for count, target in zip(counts, targets)]
            chosen = int(np.argmax(deficits))
            counts[chosen] += len(slices_by_patient[patient])
            parts[_SPLIT_PARTS[chosen]].extend(info.path for info in slices_by_patient[patient])
    return parts


def make_split(items, method='patient', seed=0, fractions=(.7, .15, .15), *, cvind=None, root=None, quiet=False):
    """Split slices into train, validation and test.

    Parameters
    ----------
    items: list of str, Slice or SliceInfo
        The slices; references are read (label and patient are needed).
    method: str
        ``'patient'`` (default): whole patients go to one part, stratified by class, aiming at ``fractions`` of each
        class's slices (see :func:`_patient_split`); no patient is in two parts.
        ``'cvind'``: the dataset's own patient-wise folds (``cvind``, from :func:`read_cvind`, indexed by the image
        number in the file name): with K folds, test is fold ``seed % K + 1`` and val fold ``(seed + 1) % K + 1``,
        the rest train — seed 0 tests on fold 1 and validates on fold 2. ``fractions`` are not used.
        ``'random'``: the seed study's split of files, ignoring patients (it used seed 42): a random permutation cut
        at ``fractions``. Slices of one patient land in several parts — a :class:`PatientLeakageWarning` says so.
    seed: int
        Seed of the random choices (``numpy.random.default_rng(seed)``).
    fractions: tuple of float
        Train, val and test fractions, summing to 1.
    cvind: array-like, optional
        The folds, required by ``'cvind'``.
    root: str, optional
        The dataset root the split file stores references relative to (default: the common folder of the items).
    quiet: bool
        Hide the progress bar while reading references.

    Returns
    -------
    Split
        Each part in natural order.
    """
    fractions = _check_fractions(fractions)
    reads_files = any(isinstance(item, (str, os.PathLike)) for item in items)
    infos = [
        item if isinstance(item, (Slice, SliceInfo)) else read_slice(item).info()
        for item in tqdm(items, desc='reading labels', unit='slice', disable=quiet or not reads_files)
    ]
    if not infos:
        raise DataError('cannot split an empty list of slices')
    seed = int(seed)
    rng = np.random.default_rng(seed)
    folds = None
    if method == 'patient':
        parts = _patient_split(infos, fractions, rng)
    elif method == 'random':
        paths = [info.path for info in sorted(infos, key=lambda info: natural_key(info.path))]
        order = [paths[position] for position in rng.permutation(len(paths))]
        train_end = int(round(fractions[0] * len(paths)))
        val_end = train_end + int(round(fractions[1] * len(paths)))
        parts = {'train': order[:train_end], 'val': order[train_end:val_end], 'test': order[val_end:]}
        warnings.warn(
            'random file split (the seed study\'s): slices of one patient can be in train and test (patient leakage), '
            'which inflates test accuracy; use the patient-wise split for results', PatientLeakageWarning,
        )
    elif method == 'cvind':
        if cvind is None:
            raise DataError("method 'cvind' needs the folds: pass cvind=read_cvind(find_cvind(source))")
        cvind = np.asarray(cvind).reshape(-1)
        fold_numbers = sorted(set(cvind.tolist()))
        if len(fold_numbers) < 3:
            raise DataError(f'cvind has {len(fold_numbers)} folds; a train/val/test split needs at least 3')
        folds = {'test': int(fold_numbers[seed % len(fold_numbers)]),
                 'val': int(fold_numbers[(seed + 1) % len(fold_numbers)])}
        parts = {name: [] for name in _SPLIT_PARTS}
        for info in infos:
            number = image_number(info.path)
            if number > cvind.size:
                raise DataError(f'image number {number} but cvind has only {cvind.size} entries', info.path, 'cvind')
            fold = int(cvind[number - 1])
            parts['test' if fold == folds['test'] else 'val' if fold == folds['val'] else 'train'].append(info.path)
    else:
        raise DataError(f"split method must be 'patient', 'cvind' or 'random', got {method!r}")
    if root is None:
        root = os.path.commonpath([os.path.dirname(info.path.split(ZIP_SEPARATOR)[0]) for info in infos])
    return Split(
        **{name: sorted(refs, key=natural_key) for name, refs in parts.items()},
        method=method, seed=seed, fractions=fractions, root=os.path.abspath(root), folds=folds,
    )


def shared_patients(split, infos):
    """Patients with slices in more than one part of ``split``: ``{patient: [parts]}``, given the slices' infos."""
    patient_by_ref = {info.path: info.patient for info in infos}
    parts_by_patient = defaultdict(set)
    for name, refs in split.parts().items():
        for ref in refs:
            if ref in patient_by_ref:
                parts_by_patient[patient_by_ref[ref]].add(name)
    return {patient: [name for name in _SPLIT_PARTS if name in parts]
            for patient, parts in sorted(parts_by_patient.items(), key=lambda item: natural_key(item[0]))
            if len(parts) > 1}


def _source_cvind(source, method):
    """The folds of ``source``'s ``cvind.mat`` where ``method`` is ``'cvind'``, else ``None``."""
    if method != 'cvind':
        return None
    ref = find_cvind(source)
    if ref is None:
        raise DataError("split method 'cvind' but no cvind.mat found", ', '.join(_sources(source)), 'cvind')
    return read_cvind(ref)


def load_split(source, split_file=None, method='patient', seed=0, fractions=(.7, .15, .15), skip_bad=False,
               quiet=False):
    """The split every command evaluates on: reused from ``split_file`` if it exists, else made (and saved there).

    Parameters
    ----------
    source: str, os.PathLike or list of them
        The dataset (see :func:`find_slices`).
    split_file: str or os.PathLike, optional
        A split JSON. If it exists it is loaded (references resolved against the dataset root, and every one checked
        to exist in ``source``); if not, the new split is saved there.
    method, seed, fractions:
        How to make a new split (see :func:`make_split`); ``'cvind'`` reads ``cvind.mat`` found by
        :func:`find_cvind`.
    skip_bad: bool
        Leave bad files out of a new split (recorded in :attr:`Split.skipped`) instead of raising.
    quiet: bool
        Hide progress bars.

    Returns
    -------
    Split
    """
    root = dataset_root(source)
    if split_file is not None and os.path.exists(split_file):
        split = Split.load(split_file, root=root)
        available = set(_list_slices(source)[0])
        missing = [ref for refs in split.parts().values() for ref in refs if ref not in available]
        if missing:
            raise DataError(
                f'{len(missing)} files of the split are not in {source}, e.g. {missing[0]}', os.fspath(split_file),
                'split file',
            )
        return split
    dataset = scan(source, skip_bad=skip_bad, quiet=quiet)
    split = make_split(dataset.slices, method, seed, fractions, cvind=_source_cvind(source, method), root=root)
    split.skipped = [[problem.ref, problem.message] for problem in dataset.skipped]
    if split_file is not None:
        split.save(split_file)
    return split


# --- checking a dataset -------------------------------------------------------------------------------------------

@dataclass
class DatasetReport:
    """What ``lrp-brain data`` prints: the scan, the split and every problem.

    Attributes
    ----------
    scan: Scan
    split: Split or None
        ``None`` where no split could be made.
    problems: list of Problem
        The scan's problems and the split's (files of a split file that are not readable slices, shared patients).
    split_note: str
        Where the split came from (made, loaded from or saved to a file) or why there is none.
    """
    scan: Scan
    split: Optional[Split]
    problems: list
    split_note: str

    @property
    def fatal_problems(self):
        """The problems that make the dataset fail the check (bad files, split files naming missing slices)."""
        return [problem for problem in self.problems if problem.fatal]

    @property
    def ok(self):
        """``True`` where no problem is fatal."""
        return not self.fatal_problems

    def format(self):
        """The report as text."""
        slices = self.scan.slices
        patients_by_class = defaultdict(set)
        for info in slices:
            patients_by_class[info.label].add(info.patient)
        slice_counts = Counter(info.label for info in slices)
        lines = [f'dataset {self.scan.root}: {len(slices)} slices of {len({i.patient for i in slices})} patients',
                 f'  {"class":<12}{"slices":>8}{"patients":>10}']
        for label, name in enumerate(CLASS_NAMES):
            lines.append(f'  {f"{label + 1} {name}":<12}{slice_counts[label]:>8}{len(patients_by_class[label]):>10}')
        sizes = Counter(info.size for info in slices)
        lines.append('image sizes: ' + ', '.join(f'{h}×{w}: {count}' for (h, w), count in sorted(sizes.items())))
        per_patient = Counter(info.patient for info in slices)
        if per_patient:
            counts = sorted(per_patient.values())
            lines.append(f'slices per patient: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}')
            entries = [f'{patient} {count}'
                       for patient, count in sorted(per_patient.items(), key=lambda item: natural_key(item[0]))]
            lines.append('slices by patient:')
            for entry in entries:  # wrapped at 120 characters, never inside an entry
                if len(lines[-1]) + len(entry) + 2 > 120:
                    lines[-1] += ','
                    lines.append(' ')
                lines[-1] += (' ' if lines[-1].endswith((':', ' ')) else ', ') + entry
        lines.append(f'split: {self.split_note}')
        if self.split is not None:
            info_by_ref = {info.path: info for info in slices}
            for name, refs in self.split.parts().items():
                infos = [info_by_ref[ref] for ref in refs if ref in info_by_ref]
                patients = {info.patient for info in infos}
                labels = Counter(info.label for info in infos)
                by_class = ', '.join(f'{CLASS_NAMES[label]} {labels[label]}' for label in range(len(CLASS_NAMES)))
                lines.append(f'  {name:<6}{len(refs):>6} slices {len(patients):>5} patients  ({by_class})')
        fatal = self.fatal_problems
        flagged = [problem for problem in self.problems if not problem.fatal]
        lines.append(f'problems: {summarise_problems(fatal) if fatal else "none"}')
        lines.extend(f'  {problem.message}' for problem in fatal)
        if flagged:
            lines.append(f'flagged (allowed): {len(flagged)}')
            lines.extend(f'  {problem.message}' for problem in flagged)
        return '\n'.join(lines)


def check_dataset(source, split_file=None, method='patient', seed=0, skip_bad=False, quiet=False):
    """Validate a dataset: read every file once, collect every problem, make or check the split.

    Parameters
    ----------
    source: str, os.PathLike or list of them
        The dataset (see :func:`find_slices`).
    split_file: str or os.PathLike, optional
        A split to check against the dataset if the file exists; otherwise the split made is saved there (only
        when there is no fatal problem, or ``skip_bad``).
    method, seed:
        How to make the split when there is no split file (see :func:`make_split`).
    skip_bad: bool
        Whether a split may be saved despite bad files (they are left out of it).
    quiet: bool
        Hide the progress bar.

    Returns
    -------
    DatasetReport
        Every problem: bad files never stop the scan here.
    """
    dataset = scan(source, skip_bad=True, quiet=quiet)
    problems = list(dataset.problems)
    split, note = None, ''
    try:
        if split_file is not None and os.path.exists(split_file):
            split = Split.load(split_file, root=dataset.root)
            note = f'{split.method} (seed {split.seed}) from {split_file}'
            readable = {info.path for info in dataset.slices}
            for ref in (ref for refs in split.parts().values() for ref in refs if ref not in readable):
                problems.append(Problem(ref, f'in split file {split_file} but not a readable slice', 'split'))
        elif dataset.slices:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', PatientLeakageWarning)
                split = make_split(dataset.slices, method, seed, cvind=_source_cvind(source, method),
                                   root=dataset.root)
            split.skipped = [[problem.ref, problem.message] for problem in dataset.skipped]
            note = f'{method} (seed {seed}{f", folds {split.folds}" if split.folds else ""})'
            if split_file is not None and (skip_bad or not dataset.skipped):
                split.save(split_file)
                note += f', saved to {split_file}'
        else:
            note = 'none (no readable slices)'
    except DataError as error:
        problems.append(Problem(error.ref or 'split', error.reason, error.kind))
        note = f'none ({error})'
    if split is not None:
        for patient, parts in shared_patients(split, dataset.slices).items():
            problems.append(Problem(
                f'patient {patient}', f'in {" and ".join(parts)} (patient leakage)', 'patient leakage',
                fatal=split.method != 'random',
            ))
    return DatasetReport(dataset, split, problems, note)
