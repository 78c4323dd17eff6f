"""Hostile input files: random and truncated bytes, HDF5 trees of the wrong structure, declared sizes that would not
fit in memory, data kept in other files, zips that try to escape their folder, pipes, and broken checkpoints.

The property of every reader test: :func:`lrp_brain.data.read_slice` returns a valid slice or raises a
:class:`~lrp_brain.data.DataError` whose message starts with the file, in bounded time and memory — never another
exception. Slice files are written in the real layout by ``figshare_files``. Hypothesis runs derandomised (the same
examples on every run) and keeps no example database.
"""
import math
import os
import re
import signal
import tempfile
import tracemalloc
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field as dataclass_field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from figshare_files import cjdata_fields, example_image, example_mask, field, header, write_mat, write_slice, write_zip
from lrp_brain.data import MAX_FILE_BYTES, MAX_SIDE, DataError, Slice, find_slices, read_slice, scan
from lrp_brain.model import (
    CheckpointError, init_imagenet, load_checkpoint, save_checkpoint, vgg16_small,
)

#: Settings of the property tests: reproducible, and the whole module well under a minute on two cores.
PROPERTY = settings(
    max_examples=60, deadline=timedelta(seconds=5), derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: The most bytes (traced by tracemalloc, which numpy reports its arrays to) reading one file here may take: the
#: valid files hold a few kB (an LZMA zip member's decoder adds its 8 MiB dictionary), and a refused one must be
#: refused before its declared values are read (the absurd ones here would take 128 MiB and more).
READ_MEMORY = 16 * 2 ** 20
#: The most seconds reading one file may take.
READ_SECONDS = 10

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
MATLAB_V5_HEADER = b'MATLAB 5.0 MAT-file, Platform: GLNXA64'.ljust(116, b' ')


@contextmanager
def bounded(seconds=READ_SECONDS, memory=READ_MEMORY):
    """Fail if the block runs longer than ``seconds`` (a SIGALRM interrupts even a blocking ``open``) or its traced
    allocations peak above ``memory`` bytes."""
    def interrupt(signum, frame):
        raise TimeoutError(f'still running after {seconds} s')

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    tracemalloc.start()
    try:
        yield
    finally:  # also when the block raised: a refusal must be bounded too
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        assert peak < memory, f'the block allocated {peak} bytes at its peak'


def read_or_refusal(ref):
    """Read ``ref`` in bounded time and memory; return the slice, checked valid, or the DataError, checked to start
    with the file. Any other exception fails the test."""
    ref = str(ref)
    try:
        with bounded():
            item = read_slice(ref)
    except DataError as error:
        assert str(error).startswith(f'{ref}: ') and error.ref == ref
        return error
    assert item.image.ndim == 2 and all(2 <= side <= MAX_SIDE for side in item.image.shape)
    assert item.image.dtype.kind in 'iuf' and np.isfinite(item.image).all()
    assert item.mask.shape == item.image.shape and item.mask.dtype == np.uint8
    assert set(np.unique(item.mask).tolist()) <= {0, 1}
    assert item.label in (0, 1, 2)
    assert isinstance(item.patient, str) and item.patient and item.patient.encode('utf-8')
    return item


def written(path, data):
    path.write_bytes(data)
    return path


# --- random and truncated bytes -----------------------------------------------------------------------------------

@PROPERTY
@given(
    prefix=st.sampled_from([b'', header(), header()[:128], HDF5_SIGNATURE, header() + HDF5_SIGNATURE,
                            MATLAB_V5_HEADER]),
    body=st.binary(max_size=2048),
)
def test_random_bytes_are_refused(prefix, body):
    with tempfile.TemporaryDirectory() as folder:
        result = read_or_refusal(written(Path(folder) / '1.mat', prefix + body))
    assert isinstance(result, DataError)


@pytest.fixture(scope='module')
def slice_file_bytes(tmp_path_factory):
    """The bytes of a valid slice file and of a zip holding it as ``1.mat``."""
    folder = tmp_path_factory.mktemp('valid')
    path = write_slice(folder / '1.mat', example_image(24, 32), example_mask(24, 32, 5, 7, 6, 9), 2, 'MR032322C')
    return path.read_bytes(), write_zip(folder / 'a.zip', {'1.mat': path}).read_bytes()


@PROPERTY
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_slice_file_is_refused(slice_file_bytes, cut):
    whole, _ = slice_file_bytes
    with tempfile.TemporaryDirectory() as folder:
        assert isinstance(read_or_refusal(written(Path(folder) / '1.mat', whole[:int(cut * len(whole))])), DataError)


@PROPERTY
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_zip_is_refused(slice_file_bytes, cut):
    _, whole = slice_file_bytes
    with tempfile.TemporaryDirectory() as folder:
        path = written(Path(folder) / 'a.zip', whole[:int(cut * len(whole))])
        assert isinstance(read_or_refusal(f'{path}::1.mat'), DataError)
        with pytest.raises(DataError, match=re.escape(str(path))):
            find_slices(path)


@PROPERTY
@given(
    compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
    position=st.floats(0, 1, exclude_max=True),
    junk=st.binary(min_size=1, max_size=32),
)
@example(compression=zipfile.ZIP_LZMA, position=0.5, junk=b'\x00')  # found: raised lzma.LZMAError, not DataError
def test_damaged_zip_gives_a_slice_or_a_data_error(slice_file_bytes, compression, position, junk):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'a.zip'
        with zipfile.ZipFile(path, 'w', compression=compression) as archive:
            archive.writestr('1.mat', slice_file_bytes[0])
        damaged = bytearray(path.read_bytes())
        start = int(position * len(damaged))
        damaged[start:start + len(junk)] = junk
        written(path, bytes(damaged))
        read_or_refusal(f'{path}::1.mat')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            try:
                refs = find_slices(path, skip_bad=True)
            except DataError as error:
                assert str(path) in str(error)
            else:
                assert all(ref.startswith(f'{path}::') for ref in refs)


@PROPERTY
@given(st.binary(max_size=512))
def test_random_bytes_named_zip_are_refused(data):
    with tempfile.TemporaryDirectory() as folder:
        path = written(Path(folder) / 'a.zip', data)
        with pytest.raises(DataError, match=re.escape(str(path))):
            find_slices(path)
        assert isinstance(read_or_refusal(f'{path}::1.mat'), DataError)


# --- HDF5 trees of the wrong structure ----------------------------------------------------------------------------

FIELDS = ('image', 'tumorMask', 'label', 'PID', 'tumorBorder')

#: Shapes declared without writing any value, several far beyond memory (HDF5 would return the fill value).
UNWRITTEN_SHAPES = [(100000, 100000), (4096, 4096), (16_000_000, 1), (1, 16_000_000), (3, 3)]


@dataclass
class Node:
    """A node of a slice file other than the valid field: written by :func:`write_node`.

    ``kind`` is one of ``'absent'``, ``'group'``, ``'array'`` (``values``, gzip-chunked if ``chunked``),
    ``'unwritten'`` (``shape`` and ``dtype`` declared, resizable and chunked, no value written), ``'null'`` (an HDF5
    null dataspace of ``dtype``), ``'strings'`` (``text`` as variable-length strings), ``'references'`` (a MATLAB cell
    array), ``'vlen'`` (variable-length integer arrays) or ``'external link'``. ``matlab_empty`` is the
    ``MATLAB_empty`` attribute to set, if any.
    """
    kind: str
    values: Optional[np.ndarray] = None
    chunked: bool = False
    shape: tuple = ()
    dtype: object = None
    text: str = ''
    matlab_empty: object = None


def write_node(group, name, node):
    """Write ``node`` as ``group[name]``."""
    if node.kind == 'absent':
        return
    if node.kind == 'group':
        group.create_group(name)
        return
    if node.kind == 'external link':
        group[name] = h5py.ExternalLink('other.mat', f'/cjdata/{name}')
        return
    if node.kind == 'array':
        chunked = node.chunked and node.values.ndim > 0 and node.values.size > 0
        dataset = group.create_dataset(name, data=node.values, compression='gzip' if chunked else None)
    elif node.kind == 'unwritten':
        dataset = group.create_dataset(name, shape=node.shape, dtype=node.dtype, maxshape=(None,) * len(node.shape),
                                       chunks=(64,) * len(node.shape), fillvalue=1)
    elif node.kind == 'null':
        dataset = group.create_dataset(name, data=h5py.Empty(node.dtype))
    elif node.kind == 'strings':
        dataset = group.create_dataset(name, data=[[node.text]], dtype=h5py.string_dtype())
    elif node.kind == 'references':
        target = group.file.require_group('#refs#').create_dataset(name, data=np.array([[77, 82]], np.uint16))
        dataset = group.create_dataset(name, shape=(1, 1), dtype=h5py.ref_dtype)
        dataset[0, 0] = target.ref
    else:
        dataset = group.create_dataset(name, shape=(1, 2), dtype=h5py.vlen_dtype(np.int32))
        dataset[0, 0], dataset[0, 1] = np.arange(3, dtype=np.int32), np.arange(1, dtype=np.int32)
    if node.matlab_empty is not None:
        dataset.attrs['MATLAB_empty'] = node.matlab_empty


@dataclass
class SliceSpec:
    """A slice file to write: the valid fields of a ``rows`` × ``columns`` slice (image of ``seed``, ``label``,
    ``pid``), with the nodes in ``replaced`` instead of some fields, and ``cjdata`` itself a ``'struct'`` (valid),
    ``'absent'``, ``'array'`` or ``'external link'``."""
    rows: int
    columns: int
    seed: int
    label: int
    pid: str
    replaced: dict = dataclass_field(default_factory=dict)
    struct: str = 'struct'

    def image(self):
        return example_image(self.rows, self.columns, seed=self.seed)

    def mask(self):
        return example_mask(self.rows, self.columns, 1, 1, self.rows // 2, self.columns // 2)

    def pid_codes(self):
        """The PID as MATLAB stores a 1×L char: UTF-16 code units (pairs for characters beyond U+FFFF)."""
        codes = np.frombuffer(self.pid.encode('utf-16-le'), dtype='<u2').reshape(1, -1)
        return field(codes, 'char', MATLAB_int_decode=np.int32(2))

    def write(self, path):
        """Write the file; return its path."""
        if self.struct != 'struct':
            nodes = {'absent': Node('array', np.zeros((2, 2))), 'array': Node('array', self.image().T),
                     'external link': Node('external link')}
            name = 'other' if self.struct == 'absent' else 'cjdata'
            return write_mat(path, {name: lambda group, key: write_node(group, key, nodes[self.struct])}, None)
        fields = cjdata_fields(self.image(), self.mask(), self.label, 'x')
        fields['PID'] = self.pid_codes()
        for name, node in self.replaced.items():
            fields[name] = lambda group, key, node=node: write_node(group, key, node)
        return write_mat(path, fields)


def array_nodes(stored_shape):
    """Arrays of random dtype, rank, shape and values; ``stored_shape`` (the image's, as HDF5 stores it) is likely,
    and so are labels near 1..3 and values that break a mask (2, NaN) or an image (NaN, inf)."""
    dtypes = st.sampled_from([np.int16, np.uint8, np.uint16, np.float64, np.float32, np.bool_, np.complex64,
                              np.dtype('S3'), np.dtype([('a', '<i4')])])
    shapes = st.one_of(st.just(stored_shape), st.just((1, 1)), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                               max_side=6))
    labels = st.sampled_from([0., 1., 2., 3., 4., 2.5, -1., np.nan, np.inf]).map(lambda value: np.full((1, 1), value))
    return st.builds(
        Node, kind=st.just('array'),
        values=st.one_of(hnp.arrays(dtypes, shapes), labels,
                         hnp.arrays(np.float64, st.just(stored_shape), elements=st.sampled_from([0., 1., 2., np.nan,
                                                                                                 np.inf]))),
        chunked=st.booleans(),
        matlab_empty=st.sampled_from([None, None, None, 0, 1, np.array([1, 0], np.uint8), np.bytes_('yes')]),
    )


def hostile_nodes(stored_shape):
    """Every kind of node that is not a valid field."""
    return st.one_of(
        array_nodes(stored_shape),
        st.sampled_from([Node('absent'), Node('group'), Node('references'), Node('vlen'), Node('external link')]),
        st.builds(Node, kind=st.just('unwritten'), shape=st.sampled_from(UNWRITTEN_SHAPES),
                  dtype=st.sampled_from([np.float64, np.uint16, np.uint8])),
        st.builds(Node, kind=st.just('null'), dtype=st.sampled_from([np.float64, np.int16])),
        st.builds(Node, kind=st.just('strings'), text=st.text(st.characters(exclude_characters='\x00'), max_size=12)),
    )


@st.composite
def slice_specs(draw):
    """A slice file whose fields are each valid or hostile, and whose ``cjdata`` is mostly a valid struct."""
    rows, columns = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    replaced = {}
    for name in FIELDS:
        if draw(st.integers(0, 3)) == 0:
            replaced[name] = draw(hostile_nodes((columns, rows)))
    return SliceSpec(
        rows, columns, draw(st.integers(0, 9)), draw(st.integers(1, 3)), draw(st.text(max_size=12)), replaced,
        draw(st.sampled_from(['struct'] * 7 + ['absent', 'array', 'external link'])),
    )


#: Nodes that no field may be: what is refused whichever field they replace (and ``'absent'``, but for the optional
#: ``tumorBorder``).
REFUSED_KINDS = ('group', 'references', 'vlen', 'unwritten', 'null', 'external link')


def check_read(spec, result):
    """Check what ``spec`` must read as: a refusal where a field is a node no field may be, or ``cjdata`` is not a
    valid struct; the values written, exactly, where every field is valid; either where some field is an array or
    strings of the wrong kind (a uint8 mask reads fine)."""
    refused = spec.struct != 'struct' or any(
        node.kind in REFUSED_KINDS or (node.kind == 'absent' and name != 'tumorBorder')
        for name, node in spec.replaced.items()
    )
    if refused:
        assert isinstance(result, DataError)
    if spec.replaced or spec.struct != 'struct':
        return
    expected_patient = spec.pid.strip('\x00 \t\r\n')
    if not expected_patient:
        assert isinstance(result, DataError) and 'cjdata.PID is empty' in str(result)
        return
    assert isinstance(result, Slice)
    np.testing.assert_array_equal(result.image, spec.image())
    np.testing.assert_array_equal(result.mask, spec.mask())
    assert (result.label, result.patient) == (spec.label - 1, expected_patient)


@settings(PROPERTY, max_examples=200)
@given(spec=slice_specs())
# found: a character beyond U+FFFF, stored by MATLAB as a UTF-16 surrogate pair, was read as two lone surrogates
@example(spec=SliceSpec(2, 2, 0, 1, '\U00010000'))
def test_hdf5_trees_give_a_valid_slice_or_a_data_error(spec):
    with tempfile.TemporaryDirectory() as folder:
        result = read_or_refusal(spec.write(Path(folder) / '1.mat'))
    check_read(spec, result)


ODD_FIELDS = {
    'null label': ('label', Node('null', dtype=np.float64), 'cjdata.label has no values (an HDF5 null dataspace)'),
    'MATLAB_empty array': ('PID', Node('array', np.full((1, 1), 65, np.uint16),
                                       matlab_empty=np.array([1, 0], np.uint8)),
                           'cjdata.PID has the attribute MATLAB_empty = [1, 0]; expected 0 or 1'),
    'MATLAB_empty text': ('PID', Node('array', np.full((1, 1), 65, np.uint16), matlab_empty=np.bytes_('yes')),
                          "cjdata.PID has the attribute MATLAB_empty = b'yes'; expected 0 or 1"),
    'PID a cell': ('PID', Node('references'), 'cjdata.PID has dtype object references (a MATLAB cell array?)'),
    'PID of integer arrays': ('PID', Node('vlen'), 'cjdata.PID has dtype variable-length arrays of int32'),
    'lone surrogate in PID': ('PID', Node('array', np.array([[0xD800], [65]], np.uint16)),
                              'cjdata.PID holds UTF-16 surrogate codes that pair into no character'),
    'mask a group': ('tumorMask', Node('group'), 'cjdata.tumorMask is a Group, not an array'),
}


@pytest.mark.parametrize('case', ODD_FIELDS)
def test_odd_fields_are_refused_naming_the_field(tmp_path, case):
    """Before, these gave a message about a corrupt file (null, MATLAB_empty), or read a patient id that is no text:
    ``'<HDF5 object reference>'``, ``'[0 1 2]'``, a lone surrogate."""
    name, node, message = ODD_FIELDS[case]
    error = read_or_refusal(SliceSpec(4, 4, 0, 1, 'A', {name: node}).write(tmp_path / '1.mat'))
    assert isinstance(error, DataError) and message in str(error)


@settings(PROPERTY, max_examples=25)
@given(spec=slice_specs())
def test_scan_reads_past_hostile_files(spec):
    with tempfile.TemporaryDirectory() as folder:
        good = write_slice(Path(folder) / '1.mat', example_image(8, 8, seed=99), example_mask(8, 8, 1, 1, 3, 3), 1,
                           'GOOD')
        hostile = spec.write(Path(folder) / '2.mat')
        result = scan(folder, skip_bad=True, quiet=True)
        assert result.slices[0].path == str(good)
        assert len(result.slices) + len(result.skipped) == 2
        assert [problem.ref for problem in result.skipped] in ([], [str(hostile)])
        try:
            strict = scan(folder, quiet=True)
        except DataError as error:
            assert error.ref == str(hostile) and [problem.ref for problem in result.skipped] == [str(hostile)]
        else:
            assert len(strict.slices) == 2


# --- sizes refused before reading ---------------------------------------------------------------------------------

def declared(name, shape, dtype=np.float64, chunked=True):
    """A field of ``shape`` (as HDF5 stores it) declared without any value written: resizable in chunks of 64 (or
    contiguous), with a fill value for numbers."""
    def write(group, key):
        group.create_dataset(key, shape=shape, dtype=dtype, chunks=(64,) * len(shape) if chunked else None,
                             maxshape=(None,) * len(shape) if chunked else None,
                             fillvalue=1 if np.dtype(dtype).kind in 'iuf' else None)
    return name, write


ABSURD_SHAPES = {
    'image 100000²': (declared('image', (100000, 100000)), 'cjdata.image has shape (100000, 100000); expected a 2-D '
                                                          f'image with sides from 2 to {MAX_SIDE}'),
    'image 4096², chunks unwritten': (declared('image', (4096, 4096)),
                                      'cjdata.image of shape (4096, 4096) is not all in the file: 0 of its 4096 '
                                      'chunks are stored'),
    'image 4096², contiguous unwritten': (declared('image', (4096, 4096), chunked=False),
                                          'is not all in the file: 0 of its 134217728 bytes are stored'),
    'label of 16M values': (declared('label', (1, 16_000_000)), 'cjdata.label has 16000000 values; expected at most 1'),
    'PID of 16M characters': (declared('PID', (16_000_000, 1), np.uint16),
                              'cjdata.PID has 16000000 values; expected at most 256'),
    'PID of 1 MB strings': (declared('PID', (256, 1), np.dtype('S1048576')),
                            'cjdata.PID would take 268435456 bytes in memory, more than the 134217728 accepted'),
}


@pytest.mark.parametrize('case', ABSURD_SHAPES)
def test_absurd_declared_sizes_are_refused_before_reading(tmp_path, case):
    (name, write), message = ABSURD_SHAPES[case]
    fields = cjdata_fields(example_image(8, 8), example_mask(8, 8, 1, 1, 3, 3), 1, 'A')
    fields[name] = write
    path = write_mat(tmp_path / '1.mat', fields)
    assert path.stat().st_size < 100_000
    error = read_or_refusal(path)  # within READ_MEMORY: nothing declared was read
    assert isinstance(error, DataError) and message in str(error)


def test_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = written(tmp_path / '1.mat', header())
    os.truncate(path, MAX_FILE_BYTES + 1)  # sparse: no disk used
    error = read_or_refusal(path)
    assert f'file is {MAX_FILE_BYTES + 1} bytes, more than the {MAX_FILE_BYTES} accepted' in str(error)


def test_zip_member_declaring_more_than_the_cap_is_refused_unread(tmp_path):
    member = write_slice(tmp_path / '1.mat', example_image(8, 8), example_mask(8, 8, 1, 1, 3, 3), 1, 'A')
    archive = bytearray(write_zip(tmp_path / 'a.zip', {'1.mat': member}).read_bytes())
    entry = archive.index(b'PK\x01\x02')  # the central directory entry; its uncompressed size is at bytes 24-27
    archive[entry + 24:entry + 28] = (MAX_FILE_BYTES + 1).to_bytes(4, 'little')
    path = written(tmp_path / 'a.zip', bytes(archive))
    error = read_or_refusal(f'{path}::1.mat')
    assert f'zip member is {MAX_FILE_BYTES + 1} bytes, more than the {MAX_FILE_BYTES} accepted' in str(error)


# --- data kept elsewhere, pipes, zips escaping their folder -------------------------------------------------------

def external_storage(image_file):
    def write(group, key):
        group.create_dataset(key, shape=(8, 8), dtype=np.int16, external=[(str(image_file), 0, 8 * 8 * 2)])
    return write


def external_link(image_file):
    def write(group, key):
        group[key] = h5py.ExternalLink(str(image_file), '/cjdata/image')
    return write


def virtual_dataset(image_file):
    def write(group, key):
        layout = h5py.VirtualLayout(shape=(8, 8), dtype=np.int16)
        layout[:] = h5py.VirtualSource(str(image_file), '/cjdata/image', shape=(8, 8))
        group.create_virtual_dataset(key, layout)
    return write


@pytest.mark.parametrize('make, message', [
    (external_storage, 'cjdata.image keeps its values in another file; refused'),
    (external_link, "'image' in cjdata is a link into another file; refused"),
    (virtual_dataset, 'cjdata.image keeps its values in another file; refused'),
])
def test_values_in_another_file_are_refused(tmp_path, make, message):
    """Each of these would read a valid image from ``other.mat`` (or any file on the machine)."""
    other = write_slice(tmp_path / 'other.mat', example_image(8, 8), example_mask(8, 8, 1, 1, 3, 3), 1, 'A')
    fields = cjdata_fields(example_image(8, 8), example_mask(8, 8, 1, 1, 3, 3), 1, 'A')
    fields['image'] = make(other)
    error = read_or_refusal(write_mat(tmp_path / '1.mat', fields))
    assert isinstance(error, DataError) and message in str(error) and error.kind == 'external data'


def test_pipe_named_like_a_slice_or_zip_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / '1.mat')
    os.mkfifo(tmp_path / '2.zip')
    refusal = 'is a FIFO (named pipe), not a regular file; expected a .mat slice or a zip of them'
    assert str(read_or_refusal(tmp_path / '1.mat')) == f'{tmp_path / "1.mat"}: {refusal}'
    with bounded(), pytest.raises(DataError, match=re.escape(f'{tmp_path / "2.zip"}: {refusal}')):
        find_slices(tmp_path)  # lists 1.mat without opening it
    with bounded():
        result = scan(tmp_path, skip_bad=True, quiet=True)
    assert result.slices == []
    assert sorted(problem.message for problem in result.skipped) == [
        f'{tmp_path / name}: {refusal}' for name in ('1.mat', '2.zip')
    ]


def listings(*folders):
    """Every path under the folders (recursively for the first), to show that nothing was written."""
    first, *others = folders
    return sorted(map(str, first.rglob('*'))), [sorted(os.listdir(folder)) for folder in others]


@pytest.mark.parametrize('name', ['../x.mat', 'a/../../x.mat', '..\\x.mat', '/abs.mat', 'C:evil.mat'])
def test_zip_member_escaping_its_folder_is_refused_and_nothing_is_extracted(tmp_path, name):
    dataset = tmp_path / 'dataset'
    dataset.mkdir()
    member = write_slice(tmp_path / 'source.mat', example_image(8, 8), example_mask(8, 8, 1, 1, 3, 3), 1, 'A')
    path = dataset / 'a.zip'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.write(member, '1.mat')
        archive.writestr(zipfile.ZipInfo(name), member.read_bytes())  # ZipInfo keeps the name as given
    before = listings(tmp_path, tmp_path.parent, Path.cwd(), Path('/'))
    escaping = f'{path}::{name}'

    with pytest.raises(DataError, match=re.escape(f'{escaping}: member name would escape the zip folder; refused')):
        find_slices(dataset)
    with pytest.warns(UserWarning, match=re.escape(f'skipped {escaping}: member name would escape')):
        assert find_slices(dataset, skip_bad=True) == [f'{path}::1.mat']
    assert scan(dataset, skip_bad=True, quiet=True).skipped[0].ref == escaping
    # named directly, the member is read like any other: into memory, never written to disk
    assert read_or_refusal(escaping).patient == 'A'
    assert listings(tmp_path, tmp_path.parent, Path.cwd(), Path('/')) == before


# --- checkpoints --------------------------------------------------------------------------------------------------

def saved_state_dict(path, state_dict):
    torch.save(state_dict, path)
    return path


@pytest.mark.parametrize('change, message', [
    (lambda weights: weights.pop('features.0.bias'), 'missing features.0.bias'),
    (lambda weights: weights.update({'features.2.bias': torch.zeros(5)}),
     r'features\.2\.bias: checkpoint \(5,\) vs model \(4,\)'),
])
def test_state_dict_key_problems_name_the_key(tmp_path, change, message):
    weights = vgg16_small(width=4).state_dict()
    change(weights)
    with pytest.raises(CheckpointError, match=r'weights\.pth: the weights, vgg16 \(width 4, 3 classes\), do not fit '
                                              rf'vgg16 \(width 4, 3 classes\): {message}$'):
        load_checkpoint(saved_state_dict(tmp_path / 'weights.pth', weights))


def test_checkpoint_with_a_non_tensor_weight_names_the_key(tmp_path):
    path = tmp_path / 'odd.pt'
    save_checkpoint(path, vgg16_small(width=4), {})
    payload = torch.load(path, weights_only=True)
    payload['state_dict']['features.0.bias'] = 'text'
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match='features.0.bias: checkpoint holds a str, not a tensor'):
        load_checkpoint(path)


@pytest.mark.parametrize('value', [math.nan, math.inf])
def test_weights_with_nan_or_inf_are_refused_naming_the_key(tmp_path, value):
    weights = vgg16_small(width=4).state_dict()
    weights['features.2.weight'][0, 0, 0, :2] = value
    weights['classifier.6.bias'][1] = value
    path = saved_state_dict(tmp_path / 'weights.pth', weights)
    with pytest.raises(CheckpointError, match=r'weights\.pth: the weights are broken: features\.2\.weight holds 2 NaN '
                                              r'or infinite values; classifier\.6\.bias holds 1 NaN or infinite '
                                              r'values$'):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r'weights\.pth: the ImageNet weights are broken: features\.2\.weight '
                                              r'holds 2 NaN or infinite values$'):  # the head is not loaded
        init_imagenet(vgg16_small(width=4), path)


def test_damaged_checkpoint_message_never_advises_unsafe_loading(tmp_path):
    """torch's own message suggests retrying with weights_only=False; the refusal quotes only its reason."""
    path = written(tmp_path / 'text.pt', b'not a checkpoint')
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    reason = f'Unsupported operand {ord("n")}'  # the first byte, which starts no pickle
    assert str(caught.value) == f'{path}: not a readable torch checkpoint (corrupt or truncated?): {reason}'


def test_metadata_naming_a_huge_network_is_refused_before_building_it(tmp_path):
    path = tmp_path / 'huge.pt'
    save_checkpoint(path, vgg16_small(width=4), {})
    payload = torch.load(path, weights_only=True)
    payload['meta']['width'] = 10 ** 6  # built for real, its second convolution alone would need 36 TB
    torch.save(payload, path)
    # the recorded head (issue J) is checked against the features' output first: refused from the metadata alone
    with pytest.raises(CheckpointError, match=r'huge\.pt: meta field head\[0\]: Linear\(1568→256\) reads 1568 '
                                              r'features, but 392000000 come before it'):
        load_checkpoint(path)


def test_bare_state_dict_with_a_head_that_is_not_torchvisions_says_what_to_do(tmp_path):
    weights = vgg16_small(width=4).state_dict()
    weights['classifier.7.bias'] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"weights\.pth: a bare state dict of vgg16 \(width 4, 3 classes\) "
                                              r"whose classifier is not torchvision's .* found classifier\.0 "
                                              r"Linear\(1568→256\), .*classifier\.7 bias \(3,\)\. .*save_checkpoint"
                                              r".*lrp-brain import"):
        load_checkpoint(saved_state_dict(tmp_path / 'weights.pth', weights))
