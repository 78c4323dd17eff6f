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
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np

from lrp_brain.data.files import (
    _HDF5_SIGNATURE, _HEAD_BYTES, MAX_SIDE, ZIP_SEPARATOR, DataError, Problem, _list_files, _read_bytes, _sources,
    _what_file, dataset_root, listed_or_refused, natural_key,
)
from lrp_brain.data.slices import CLASS_NAMES, Slice

#: The largest array read into memory, in bytes: an image of MAX_SIDE² float64 values.
MAX_ARRAY_BYTES = MAX_SIDE ** 2 * 8
#: The longest patient id accepted, in characters (the Figshare ones have 6 to 12).
MAX_PID_LENGTH = 256


# HDF5 looks for its superblock at offset 0 and at 512, 1024, 2048, ... (MATLAB v7.3 puts it at 512)
_SUPERBLOCK_OFFSETS = (0,) + tuple(512 * 2 ** power for power in range(8))


def _is_slice_name(name):
    base = os.path.basename(name)
    return (
        base.lower().endswith('.mat') and base.lower() != 'cvind.mat' and not base.startswith('._')
        and '__MACOSX' not in name.split('/')
    )


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
    return listed_or_refused(*_list_slices(source), skip_bad)


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
    raise DataError(f'not a MATLAB v7.3 MAT-file (no MATLAB header or HDF5 signature): it is '
                    f'{_what_file(data[:_HEAD_BYTES])}', ref, 'not a MAT-file')


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
    full_scale = float(np.iinfo(image.dtype).max) if image.dtype.kind in 'iu' else None
    return Slice(image, mask, int(label) - 1, patient, str(ref), border, digest, full_scale=full_scale)


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


@dataclass(frozen=True)
class FigshareDataset:
    """The Figshare slices of a source as a dataset, for :func:`lrp_brain.data.dataset.open_dataset`.

    Its interface, shared with :class:`lrp_brain.data.images.ImageFolder`: ``root`` (what split files store
    references relative to), ``sources`` (the paths given, for messages), ``class_names``, ``has_patients``
    (whether patient ids are known, so a patient-wise split keeps patients apart), ``has_masks``, ``mask_field``
    (what messages call the mask), ``list_files()``
    (``(refs, problems)``), ``read(ref)`` (a :class:`~lrp_brain.data.slices.Slice`) and ``folds()`` (the
    dataset's own cross-validation folds, or ``None``).

    Attributes
    ----------
    source: str, os.PathLike or list of them
        See :func:`find_slices`.
    """
    source: object
    class_names = CLASS_NAMES
    has_patients = True
    has_masks = True
    mask_field = 'cjdata.tumorMask'

    @property
    def root(self):
        return dataset_root(self.source)

    @property
    def sources(self):
        return _sources(self.source)

    def list_files(self):
        return _list_slices(self.source)

    def read(self, ref):
        return read_slice(ref)

    def folds(self):
        """The folds of the first ``cvind.mat`` found (see :func:`find_cvind`), or ``None``."""
        ref = find_cvind(self.source)
        return None if ref is None else read_cvind(ref)
