"""Write files in the exact layout of the Figshare brain-tumour dataset, for tests.

Written from the format's description, independently of ``lrp_brain.phantom``: a MATLAB v7.3 file is an HDF5 file
behind a 512-byte header ("MATLAB 7.3 MAT-file, ...", version 0x0200, endian mark "IM" at bytes 124-127). A struct
is an HDF5 group with ``MATLAB_class = 'struct'``; each field a dataset with its ``MATLAB_class``. MATLAB stores
column-major, so a rows × columns MATLAB array appears in HDF5 as (columns, rows): a 1×L char row (``'MR032322C'``)
is an (L, 1) dataset of uint16 character codes, an L×1 char column an (1, L) one.

Functions take arrays the way MATLAB (and the reader) index them, ``image[row, column]``, and transpose on writing.
"""
import zipfile

import h5py
import numpy as np

HEADER_TEXT = b'MATLAB 7.3 MAT-file, Platform: PCWIN64, Created on: Wed Apr 01 10:00:00 2015 HDF5 schema 1.00 .'


def header():
    """The 512-byte userblock MATLAB writes in front of a v7.3 file."""
    block = bytearray(512)
    block[:116] = HEADER_TEXT.ljust(116, b' ')
    block[124:126] = (0x0200).to_bytes(2, 'little')
    block[126:128] = b'IM'
    return bytes(block)


def field(matlab_array, matlab_class, **attributes):
    """A field to write: ``(array as HDF5 stores it, attributes)``; ``matlab_array`` is MATLAB-oriented."""
    attributes = {'MATLAB_class': np.bytes_(matlab_class), **attributes}
    return np.asarray(matlab_array).T, attributes


def char(text, orientation='row'):
    """A MATLAB char array of ``text``: a 1×L row (as MATLAB writes ``'abc'``) or an L×1 column."""
    codes = np.array([ord(letter) for letter in text], dtype=np.uint16)
    shape = (1, -1) if orientation == 'row' else (-1, 1)
    return field(codes.reshape(shape), 'char', MATLAB_int_decode=np.int32(2))


def cjdata_fields(image, mask, label, pid, border=None, pid_orientation='row', mask_class='logical'):
    """The five fields of a Figshare ``cjdata`` struct, in MATLAB orientation (see :func:`field`)."""
    if border is None:
        rows, columns = np.nonzero(mask)
        border = np.stack([columns + 1, rows + 1], axis=1)[:8]  # some (x, y) points, 1-based as MATLAB draws them
    mask_attributes = {'MATLAB_int_decode': np.int32(1)} if mask_class == 'logical' else {}
    return {
        'image': field(np.asarray(image, dtype=np.int16), 'int16'),
        'tumorMask': field(np.asarray(mask, dtype=np.uint8), mask_class, **mask_attributes),
        'label': field(np.array([[label]], dtype=np.float64), 'double'),
        'PID': char(pid, pid_orientation),
        'tumorBorder': field(np.asarray(border, dtype=np.float64).reshape(1, -1), 'double'),
    }


def write_mat(path, variables, struct='cjdata'):
    """Write a MATLAB v7.3 file: ``variables`` ``{name: (stored array, attributes)}`` inside a struct group named
    ``struct`` (or at the top level if ``None``). Values given as a callable ``f(group, name)`` write themselves."""
    with h5py.File(path, 'w', userblock_size=512) as file:
        group = file
        if struct is not None:
            group = file.create_group(struct)
            group.attrs['MATLAB_class'] = np.bytes_('struct')
        for name, value in variables.items():
            if callable(value):
                value(group, name)
                continue
            stored, attributes = value
            dataset = group.create_dataset(name, data=stored)
            for key, attribute in attributes.items():
                dataset.attrs[key] = attribute
    with open(path, 'r+b') as file:
        file.write(header())
    return path


def write_slice(path, image, mask, label, pid, border=None, pid_orientation='row', mask_class='logical'):
    """Write one Figshare slice file; ``label`` as stored (1, 2, 3)."""
    return write_mat(path, cjdata_fields(image, mask, label, pid, border, pid_orientation, mask_class))


def write_cvind(path, folds, orientation='column'):
    """Write ``cvind.mat``: the fold of every image as a MATLAB N×1 (``'column'``) or 1×N double."""
    folds = np.asarray(folds, dtype=np.float64)
    matlab = folds[:, None] if orientation == 'column' else folds[None, :]
    return write_mat(path, {'cvind': field(matlab, 'double')}, struct=None)


def example_image(rows, columns, seed=0):
    """An int16 image with no symmetry, so any transposition or flip shows: a ramp plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.arange(rows)[:, None] * 7 + np.arange(columns)[None, :] * 3
    return (ramp + rng.integers(0, 50, size=(rows, columns))).astype(np.int16)


def example_mask(rows, columns, top, left, height, width):
    """A rectangle mask (uint8)."""
    mask = np.zeros((rows, columns), dtype=np.uint8)
    mask[top:top + height, left:left + width] = 1
    return mask


def write_zip(path, members):
    """Write a zip of ``{member name: file path}`` (deflated, as the Figshare zips are)."""
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        for name, source in members.items():
            archive.write(source, name)
    return path
