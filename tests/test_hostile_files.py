"""Hostile image and checkpoint files, round two (issue M, classes 2, 3, 9 and 11): images read by their mode as
Pillow converts them, sizes refused from the header in bounded memory, zip members read in bounded chunks whatever
their header says, file names that are not UTF-8 drawn in figure titles, and messages that say what a file is and
what was expected.

Every file is written here: images with Pillow, or byte by byte where Pillow would need the memory under test (PNG
chunks with zlib, a zip's headers with struct). Expected pixels come from numpy on the arrays written (lossless
PNG) or from Pillow's own conversion (lossy JPEG); memory is measured in a fresh process with
:func:`resource.getrusage`.
"""
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from contextlib import contextmanager

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from figshare_files import example_image, example_mask, write_slice
from lrp_brain.cli import main
from lrp_brain.data import MAX_SIDE, DataError, Transform, read_image_file, read_slice
from lrp_brain.explain_files import explain_inputs, gather_inputs
from lrp_brain.figures import four_panel, per_class_figure
from lrp_brain.model import CheckpointError, default_meta, load_checkpoint, save_checkpoint, vgg16_small
from lrp_brain.sources import open_model

pytestmark = pytest.mark.usefixtures('single_threaded')

#: The most a refused file may add to a fresh process's peak resident memory, in bytes (before: gigabytes).
GROWTH = 50 * 2 ** 20
#: The most seconds a refusal may take (before: 20 s for a 13000² PNG).
SECONDS = 5
SIZE = 32


@contextmanager
def within(seconds=SECONDS):
    """Fail if the block runs longer than ``seconds``: a SIGALRM interrupts even an ``open`` blocked on a FIFO."""
    def interrupt(signum, frame):
        raise TimeoutError(f'still running after {seconds} s')

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refusal(read, path):
    """The message of the DataError ``read(path)`` raises, within :data:`SECONDS`."""
    with within(), pytest.raises(DataError) as caught:
        read(path)
    return str(caught.value)


#: Run in a fresh process: for each ``[function, ref]`` of the JSON list argv[1], call lrp_brain.data's function on
#: ref; print, for each, the refusal (or the number of values read), the seconds taken and how much the call raised
#: the process's peak resident memory above its resident memory before the call, in bytes. The peak is the kernel's
#: VmHWM, reset before each call (writing 5 to /proc/self/clear_refs): getrusage's ru_maxrss cannot be reset and, as
#: execve keeps it, starts at the size of the (large) pytest process that started this one.
MEASURE = '''
import json, sys, time
from lrp_brain import data
def status(field):
    with open('/proc/self/status') as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith(field + ':'))  # kB
def reset_peak():
    with open('/proc/self/clear_refs', 'w') as file:
        file.write('5')
def peak():
    return status('VmHWM')
results = []
for function, ref in json.loads(sys.argv[1]):
    reset_peak()
    before, start = status('VmRSS'), time.perf_counter()
    try:
        result = getattr(data, function)(ref)
        outcome = f'read {getattr(result, "image", result).size} values'
    except data.DataError as error:
        outcome = str(error)
    results.append({'outcome': outcome, 'seconds': time.perf_counter() - start, 'growth': peak() - before,
                    'peak': peak()})
print(json.dumps(results))
'''


def measured(calls):
    """Run ``lrp_brain.data.<function>(ref)`` for each ``(function, ref)`` of ``calls``, in order, in one fresh
    process; return their outcomes, seconds and memory growths."""
    arguments = json.dumps([[function, str(ref)] for function, ref in calls])
    result = subprocess.run([sys.executable, '-c', MEASURE, arguments], capture_output=True, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def saved(path, image, **options):
    image.save(path, **options)
    return path


def grey(rows, columns, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (rows, columns), dtype=np.uint8)


# --- 2. images read by their mode ---------------------------------------------------------------------------------

def test_cmyk_jpeg_reads_as_pillow_converts_it_not_inverted(tmp_path):
    """Before: read as four channels (C, M, Y as red, green, blue, K as alpha), correlation -1 with the image."""
    ramp = np.tile(np.linspace(0, 255, 48), (40, 1))
    rgb = np.stack([ramp, ramp / 2, 255 - ramp / 3], axis=-1).astype(np.uint8)
    path = saved(tmp_path / 'cmyk.jpg', Image.fromarray(rgb).convert('CMYK'), quality=95)
    with Image.open(path) as image:
        assert image.mode == 'CMYK'
        expected = np.asarray(image.convert('RGB'), dtype=np.float64).mean(axis=-1)
    pixels = read_image_file(path)
    np.testing.assert_array_equal(pixels, expected)
    truth = rgb.astype(np.float64).mean(axis=-1)
    assert np.corrcoef(pixels.ravel(), truth.ravel())[0, 1] > 0.99 and np.abs(pixels - truth).max() < 8


def test_palette_png_reads_through_its_palette(tmp_path):
    """Palette indices in an order unrelated to brightness; the grey value is the mean of each index's colour."""
    palette = np.random.default_rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = grey(12, 20)
    image = Image.fromarray(indices, 'P')
    image.putpalette(palette.ravel().tolist())
    path = saved(tmp_path / 'palette.png', image, transparency=7)
    np.testing.assert_array_equal(read_image_file(path), palette[indices].astype(np.float64).mean(axis=-1))


@pytest.mark.parametrize('mode', ['RGBA', 'LA'])
def test_alpha_is_dropped_not_composited(tmp_path, mode):
    """An alpha channel of 0 (fully transparent) to 255 changes nothing: the colour under it is read."""
    channels = 4 if mode == 'RGBA' else 2
    values = np.random.default_rng(2).integers(0, 256, (10, 14, channels), dtype=np.uint8)
    path = saved(tmp_path / f'{mode}.png', Image.fromarray(values, mode))
    np.testing.assert_array_equal(read_image_file(path), values[..., :-1].astype(np.float64).mean(axis=-1))


@pytest.mark.parametrize('values, mode, expected', [
    (np.array([[0, 1, 255, 256], [4095, 4096, 65534, 65535]], dtype=np.uint16), 'I;16', None),
    (np.array([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=bool), '1', np.array([[0, 255, 255, 0], [255, 255, 0, 0]])),
])
def test_grey_images_keep_their_values(tmp_path, values, mode, expected):
    """16 bits at their full range 0 .. 65535, one bit as 0 and 255."""
    image = Image.fromarray(values)
    assert image.mode == mode
    path = saved(tmp_path / 'grey.png', image)
    np.testing.assert_array_equal(read_image_file(path), values if expected is None else expected)


#: What a viewer shows for each EXIF orientation, from the stored (H, W) array: the EXIF definitions (2: mirrored,
#: 3: rotated 180°, 4: mirrored vertically, 5: mirrored then rotated 90° anticlockwise, 6: rotated 90° clockwise, 7:
#: mirrored then rotated 90° clockwise, 8: rotated 90° anticlockwise).
UPRIGHT = {
    1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
    5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize('orientation', UPRIGHT)
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = grey(3, 5)
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    path = saved(tmp_path / 'exif.png', Image.fromarray(stored), exif=exif)
    np.testing.assert_array_equal(read_image_file(path), UPRIGHT[orientation](stored))


@pytest.mark.parametrize('name, write, what', [
    ('animated.png', {'format': 'PNG'}, 'an animated PNG'),
    ('pictures.jpg', {'format': 'MPO'}, 'a multi-picture JPEG'),
])
def test_files_of_several_frames_are_refused(tmp_path, name, write, what):
    """Before: an animated PNG's frames became colour channels."""
    frames = [Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).convert('RGB') for value in (0, 100, 200)]
    path = saved(tmp_path / name, frames[0], save_all=True, append_images=frames[1:], **write)
    assert refusal(read_image_file, path) == (f'{path}: holds 3 frames ({what}); expected a single image: save the '
                                              f'frame to explain as a file of its own')


def test_non_square_image_is_padded_to_a_square_not_stretched(tmp_path):
    """Centred, with the image's minimum (value_range[0] after scaling) and 0 in the mask; an odd margin puts the
    extra row at the bottom. Before: stretched to the square."""
    values = np.array([[10, 20, 30, 40, 50], [60, 70, 80, 90, 100], [110, 120, 130, 140, 10]], dtype=np.uint8)
    path = saved(tmp_path / 'wide.png', Image.fromarray(values))
    pixels = read_image_file(path)
    np.testing.assert_array_equal(pixels, values)  # as stored: the padding is the transform's
    mask = np.zeros((3, 5))
    mask[1, 1:3] = 1
    image, mask_out = Transform(size=5, value_range=(-1., 1.))(pixels, mask)
    scaled = -1 + 2 * (values.astype(np.float64) - 10) / 130
    expected = np.full((5, 5), -1.)
    expected[1:4] = scaled
    np.testing.assert_allclose(image.numpy(), np.broadcast_to(expected, (3, 5, 5)), atol=1e-6)
    expected_mask = np.zeros((5, 5))
    expected_mask[2, 1:3] = 1
    np.testing.assert_array_equal(mask_out.numpy(), expected_mask)


# --- 3. memory before limits --------------------------------------------------------------------------------------

def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def deflated(chunk, count, wbits=15):
    """``chunk`` repeated ``count`` times, deflated (zlib-wrapped for ``wbits`` 15, raw for -15) without compressing
    it more than once: a block ended by a full flush starts afresh, so the stream may repeat it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)  # the first also has the zlib header
    tail = compressor.flush()
    if wbits > 0:  # zlib's trailer is the Adler-32 of all the data
        tail = tail[:-4] + struct.pack('>I', adler32(chunk, count))
    return head + block * (count - 1) + tail


def adler32(chunk, count):
    value = 1
    for _ in range(count):
        value = zlib.adler32(chunk, value)
    return value


def write_constant_png(path, width, height, rows=None):
    """An 8-bit grey PNG of zeros (a few hundred kB for 13000²) with ``rows`` of its rows stored, all if None."""
    row = bytes(width + 1)  # filter byte 0, then the pixels
    data = deflated(row, height if rows is None else rows)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
                     + png_chunk(b'IDAT', data) + png_chunk(b'IEND', b''))
    return path


def test_png_past_pillows_bomb_limit_is_refused_without_a_warning(tmp_path):
    """Before: a DecompressionBombError traceback."""
    path = write_constant_png(tmp_path / 'bomb.png', 30000, 30000, rows=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert refusal(read_image_file, path) == (f'{path}: image is 30000×30000 pixels; expected sides from 2 to '
                                                  f'{MAX_SIDE} (refused from its header, before decoding)')


def write_zip_by_hand(path, name, data, declared_size, crc):
    """A zip of one member of deflated ``data`` whose local header and central directory both state ``declared_size``
    and ``crc``, whatever the data are."""
    name = name.encode()
    sizes = struct.pack('<III', crc, len(data), declared_size)
    local = struct.pack('<IHHHHH', 0x04034b50, 20, 0, 8, 0, 0) + sizes + struct.pack('<HH', len(name), 0) + name
    central = (struct.pack('<IHHHHHH', 0x02014b50, 20, 20, 0, 8, 0, 0) + sizes
               + struct.pack('<HHHHHII', len(name), 0, 0, 0, 0, 0, 0) + name)
    end = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)
    return path


def lying_zip(path, crc_of):
    """A 300 MiB member ``1.mat`` of zeros (300 kB deflated) whose headers say it holds 1000 bytes, with the checksum
    of all of them or, as a forger would write it, of the stated prefix."""
    chunk = bytes(2 ** 20)
    crc = zlib.crc32(bytes(1000))
    if crc_of == 'all':
        crc = 0
        for _ in range(300):
            crc = zlib.crc32(chunk, crc)
    return f'{write_zip_by_hand(path, "1.mat", deflated(chunk, 300, -15), 1000, crc)}::1.mat'


@pytest.fixture(scope='module')
def measurements(tmp_path_factory):
    """The files of the memory tests, read in one fresh process (importing torch takes seconds): a 13000² PNG, the
    two lying zips, and last, to show that the measure sees an allocation, a MAX_SIDE² PNG read for real."""
    folder = tmp_path_factory.mktemp('memory')
    calls = {
        'huge PNG': ('read_image_file', write_constant_png(folder / 'huge.png', 13000, 13000)),
        'zip, checksum of all': ('read_slice', lying_zip(folder / 'all.zip', 'all')),
        'zip, checksum of the prefix': ('read_slice', lying_zip(folder / 'prefix.zip', 'prefix')),
        'largest PNG': ('read_image_file', write_constant_png(folder / 'largest.png', MAX_SIDE, MAX_SIDE)),
    }
    for _, ref in calls.values():
        assert os.path.getsize(str(ref).split('::')[0]) < 1_000_000
    results = dict(zip(calls, measured(calls.values())))
    return {name: (str(ref), results[name]) for name, (_, ref) in calls.items()}


def test_huge_png_is_refused_from_its_header_in_bounded_memory(measurements):
    """Before: a 13000² PNG of 481 kB took 2.6 GB and 20 s to decode, then was refused."""
    path, result = measurements['huge PNG']
    assert result['outcome'] == (f'{path}: image is 13000×13000 pixels; expected sides from 2 to {MAX_SIDE} (refused '
                                 f'from its header, before decoding)')
    assert result['growth'] < GROWTH and result['seconds'] < SECONDS, result
    _, control = measurements['largest PNG']
    assert control['outcome'] == f'read {MAX_SIDE ** 2} values' and control['growth'] > GROWTH, control  # 128 MiB


@pytest.mark.parametrize('case, message', [
    ('zip, checksum of all', "cannot be read (Bad CRC-32 for file '1.mat')"),
    ('zip, checksum of the prefix', 'not a MATLAB v7.3 MAT-file (no MATLAB header or HDF5 signature): it is binary, '
                                    'starting with the bytes 00 00 00 00 00 00 00 00'),
])
def test_zip_member_understating_its_size_is_read_in_bounded_memory(measurements, case, message):
    """At most the stated bytes come out, a chunk at a time. Before: the whole member was inflated, then cut (a 1 MB
    zip took 2.8 GB)."""
    ref, result = measurements[case]
    assert result['outcome'] == f'{ref}: {message}'
    assert result['growth'] < GROWTH and result['seconds'] < SECONDS, result


def test_bzip2_zip_member_is_refused_unread(tmp_path):
    """zipfile gives a bzip2 decompressor a whole read's input at once, and 113 bytes of bzip2 are 100 MiB."""
    member = write_slice(tmp_path / '1.mat', example_image(8, 8), example_mask(8, 8, 1, 1, 3, 3), 1, 'A')
    path = tmp_path / 'a.zip'
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_BZIP2) as archive:
        archive.write(member, '1.mat')
    assert refusal(read_slice, f'{path}::1.mat') == (
        f'{path}::1.mat: zip member is compressed with method 12; only stored, deflate, LZMA members are read '
        f'(re-zip it with the default method, deflate)')
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_LZMA) as archive:
        archive.write(member, '1.mat')
    assert read_slice(f'{path}::1.mat').patient == 'A'


# --- 9. file names that are not UTF-8 -----------------------------------------------------------------------------

NOT_UTF8 = os.fsdecode(b'scan-\xff\xfe.png')


def test_non_utf8_file_name_is_drawn_with_its_bytes_escaped(tmp_path):
    """The name's undecodable bytes are drawn as \\xff\\xfe: the figure is the one drawn for that text. Before: a
    TypeError from matplotlib."""
    image, relevance = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 3, 8, 8)
    mask = torch.zeros(8, 8)
    drawn, reference = tmp_path / 'drawn.png', tmp_path / 'reference.png'
    four_panel(drawn, image, mask, relevance[0], mask, 0.5, title=f'{NOT_UTF8}: glioma')
    four_panel(reference, image, mask, relevance[0], mask, 0.5, title=r'scan-\xff\xfe.png: glioma')
    assert drawn.read_bytes() == reference.read_bytes()
    per_class_figure(drawn, image, relevance, [NOT_UTF8, 'b', 'c'], title=NOT_UTF8)  # class names as well
    assert drawn.read_bytes().startswith(b'\x89PNG')


def test_file_name_with_dollars_is_not_parsed_as_maths(tmp_path):
    """Before: ``a$_$b.png`` in a title raised matplotlib's mathtext ParseSyntaxException."""
    path = four_panel(tmp_path / 'drawn.png', torch.zeros(3, 8, 8), torch.zeros(8, 8), torch.ones(3, 8, 8),
                      torch.zeros(8, 8), 0.5, title='a$_$b.png: glioma')
    assert path.read_bytes().startswith(b'\x89PNG')


def test_image_with_a_non_utf8_name_is_explained_and_drawn(tmp_path):
    checkpoint = tmp_path / 'model.pt'
    save_checkpoint(checkpoint, vgg16_small(width=2), {**default_meta('vgg16', 2),
                                                       'transform': Transform(size=SIZE).to_dict(), 'input_size': SIZE})
    path = saved(tmp_path / NOT_UTF8, Image.fromarray(grey(20, 24)))
    source = open_model(str(checkpoint))
    inputs = gather_inputs(source.transform, [str(path)])
    results = explain_inputs(source, inputs, target='all', out=str(tmp_path / 'out'))
    figures = [name for name in results[0].paths if name.endswith('.png')]
    assert len(figures) == 2
    for name in figures:
        with open(name, 'rb') as file:
            assert file.read(8) == b'\x89PNG\r\n\x1a\n'


# --- 11. messages that say what a file is -------------------------------------------------------------------------

def write_hdf5(path):
    with h5py.File(path, 'w') as file:
        file['x'] = np.zeros(3)
    return path


def renamed_slice(path):
    written = write_slice(path.with_suffix('.mat'), example_image(8, 8), example_mask(8, 8, 1, 1, 3, 3), 1, 'A')
    return written.rename(path)


def damaged_png():
    """A PNG whose compressed pixels have a byte changed."""
    data = bytearray(saved(io.BytesIO(), Image.fromarray(grey(40, 40)), format='PNG').getvalue())
    data[data.index(b'IDAT') + 20] ^= 0xff
    return bytes(data)


IMAGE_FILES = {
    'empty': (lambda path: path.write_bytes(b''), 'cannot be read as an image: it is empty (0 bytes); expected a PNG '
                                                  'or JPEG image'),
    'text': (lambda path: path.write_text('patient 17, slice 4\n'),
             "cannot be read as an image: it is text, starting 'patient 17, slice 4\\n'; expected a PNG or JPEG image"),
    'MAT-file': (renamed_slice, 'cannot be read as an image: it is a MATLAB MAT-file (a Figshare slice is read from a '
                                'file named *.mat); expected a PNG or JPEG image'),
    'HDF5': (write_hdf5, 'cannot be read as an image: it is an HDF5 file; expected a PNG or JPEG image'),
    'GIF': (lambda path: Image.new('L', (4, 4)).save(path, format='GIF'),
            'cannot be read as an image: it is a GIF image; expected a PNG or JPEG image'),
    'PNG header only': (lambda path: path.write_bytes(
        b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', 8, 8, 8, 0, 0, 0, 0))),
                        'cannot be read as an image: a damaged PNG file (it ends too early)'),
    'truncated PNG': (lambda path: path.write_bytes(saved(io.BytesIO(), Image.fromarray(grey(40, 40)),
                                                          format='PNG').getvalue()[:-200]),
                      'cannot be read as an image: a damaged PNG file (it ends too early)'),
    'damaged PNG': (lambda path: path.write_bytes(damaged_png()),
                    'cannot be read as an image: a damaged PNG file (broken data stream when reading image file)'),
    'folder': (os.mkdir, 'is a folder, not a regular file; expected a PNG or JPEG image'),
    'FIFO': (os.mkfifo, 'is a FIFO (named pipe), not a regular file; expected a PNG or JPEG image'),
    'missing': (lambda path: None, 'no such file'),
}


@pytest.mark.parametrize('case', IMAGE_FILES)
def test_image_file_messages_say_what_the_file_is(tmp_path, case):
    """Before: "Could not find a backend to open … with iomode 'r'" for the files, "no such file" for a folder or
    FIFO (which is opened without waiting for a writer: nothing blocks)."""
    write, message = IMAGE_FILES[case]
    path = tmp_path / 'scan.png'
    write(path)
    assert refusal(read_image_file, path) == f'{path}: {message}'


class Payload:
    """Unpickling it would write a file: the proof that no code ran."""
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return open, (self.sentinel, 'w')


class Weights:
    """A class of the test module, which a checkpoint pickles by reference."""
    def __init__(self):
        self.values = torch.zeros(2)


CODE = f'{Weights.__module__}.{Weights.__qualname__}'
NEEDS_CODE = ('refused: loading it needs pickled code ({names}), and checkpoints are only loaded with '
              'torch.load(weights_only=True) because unpickling code can run anything. Save the weights instead, '
              'e.g. torch.save(model.state_dict(), path), or use lrp_brain.model.save_checkpoint')


def pickled(path, payload, protocol):
    with open(path, 'wb') as file:
        pickle.dump(payload, file, protocol=protocol)


def torchscript(path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit is deprecated, and still written
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)


CHECKPOINT_FILES = {
    'TorchScript': (torchscript, 'a TorchScript archive (torch.jit.save), which holds code besides the weights; '
                                 'refused: checkpoints are only loaded with torch.load(weights_only=True). Save the '
                                 'weights of the model it was scripted from instead, torch.save(model.state_dict(), '
                                 'path), or use lrp_brain.model.save_checkpoint'),
    'pickle of protocol 4 with code': (lambda path: pickled(path, {'weights': Weights()}, 4),
                                       NEEDS_CODE.format(names=CODE)),
    'torch.save of protocol 4 with code': (lambda path: torch.save({'weights': Weights()}, path, pickle_protocol=4),
                                           NEEDS_CODE.format(names=CODE)),
    'torch.save of protocol 4': (lambda path: torch.save({'w': torch.zeros(2)}, path, pickle_protocol=4),
                                 'pickled with protocol 4, which torch.load(weights_only=True) does not read; save it '
                                 'again with torch.save at its default pickle protocol (2)'),
    'empty': (lambda path: path.write_bytes(b''), 'not a readable torch checkpoint: the file is empty (0 bytes)'),
    'folder': (os.mkdir, 'is a folder, not a regular file; expected a torch checkpoint'),
    'FIFO': (os.mkfifo, 'is a FIFO (named pipe), not a regular file; expected a torch checkpoint'),
}


@pytest.mark.parametrize('case', CHECKPOINT_FILES)
def test_checkpoint_file_messages_say_what_the_file_is(tmp_path, case):
    """Before: a TorchScript file and a pickle of protocol 4 were "corrupt or truncated?" (quoting torch's advice to
    load with weights_only=False), a FIFO or folder "no such checkpoint file"."""
    write, message = CHECKPOINT_FILES[case]
    path = tmp_path / 'model.pt'
    write(path)
    with within(), pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == f'{path}: {message}'


def test_a_pickle_that_needs_code_never_runs_it(tmp_path):
    sentinel = tmp_path / 'code-ran'
    for protocol in (2, 4, 5):
        path = tmp_path / f'evil-{protocol}.pt'
        pickled(path, {'payload': Payload(str(sentinel))}, protocol)
        with pytest.raises(CheckpointError, match=re.escape(f'{path}: {NEEDS_CODE.format(names="io.open")}')):
            load_checkpoint(path)
    assert not sentinel.exists()


@pytest.mark.parametrize('make, arguments, message', [
    (lambda folder: os.mkfifo(folder / 'scan.png'), ['scan.png'],
     'scan.png: is a FIFO (named pipe), not a regular file; expected a PNG or JPEG image'),
    (lambda folder: (folder / 'scan.png').write_text('not an image'), ['scan.png'],
     "scan.png: cannot be read as an image: it is text, starting 'not an image'; expected a PNG or JPEG image"),
    (lambda folder: torchscript(folder / 'scripted.pt'), ['--checkpoint', 'scripted.pt'],
     'scripted.pt: a TorchScript archive (torch.jit.save), which holds code besides the weights; refused'),
])
def test_the_command_says_it_in_one_line_and_writes_nothing(tmp_path, make, arguments, message):
    make(tmp_path)
    if '--checkpoint' in arguments:
        saved(tmp_path / 'scan.png', Image.fromarray(grey(20, 20)))
        arguments = ['scan.png', *arguments]
    else:
        checkpoint = tmp_path / 'model.pt'
        save_checkpoint(checkpoint, vgg16_small(width=2), {**default_meta('vgg16', 2),
                                                           'transform': Transform(size=SIZE).to_dict()})
        arguments = [*arguments, '--checkpoint', 'model.pt']
    out = tmp_path / 'out'
    with within(60):
        result = CliRunner().invoke(main, ['explain', *[str(tmp_path / item) if not item.startswith('--') else item
                                                        for item in arguments], '--out', str(out), '--quiet'])
    assert result.exit_code == 1, result.output
    assert f'{tmp_path}/{message}' in result.output and 'Traceback' not in result.output
    assert 'weights_only=False' not in result.output
    assert not out.exists() or not any(out.iterdir())
