"""Reading files and zip members within bounds, and saying what a file is: the ground every format's reader stands on.

A file is named by a *reference*: a file path, or ``'path/to/file.zip::member'`` for a zip member (read into memory,
never unpacked to disk). Every problem with the data raises :class:`DataError` naming the file and field.
"""
import lzma
import os
import re
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass

#: The largest image side accepted (the Figshare slices are 512 or 256 pixels).
MAX_SIDE = 4096
#: The largest file (or zip member) read into memory, in bytes.
MAX_FILE_BYTES = 256 * 2 ** 20
#: Separates a zip file from its member in a slice reference.
ZIP_SEPARATOR = '::'


_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


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


def listed_or_refused(refs, problems, skip_bad):
    """``refs``, where listing them found no problem; otherwise the first problem raises its :class:`DataError`,
    or with ``skip_bad`` every problem is warned about (the files were left out of ``refs``)."""
    if problems and not skip_bad:
        raise problems[0].error()
    for problem in problems:
        warnings.warn(f'skipped {problem.message}')
    return refs

def natural_key(text):
    """Sort key that orders embedded numbers by value: ``'2.mat'`` before ``'10.mat'``."""
    # re.split with a group alternates text (even positions) and digit runs (odd positions)
    return [int(part) if position % 2 else part for position, part in enumerate(re.split('([0-9]+)', str(text)))]


#: What a path that is not a regular file is, by the type bits of its mode.
_SPECIAL_FILES = (
    (stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO (named pipe)'), (stat.S_ISCHR, 'a character device'),
    (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket'),
)


def open_regular_file(path, expected, ref=None):
    """Open ``path`` to read bytes, refusing anything but a regular file (links are followed) before a byte is read.

    The file is opened without blocking and then checked, so a FIFO never waits for a writer, and a path replaced
    between a check and the open cannot slip through.

    Parameters
    ----------
    path: str or os.PathLike
    expected: str
        What the file should be, for the message refusing another kind, e.g. ``'a PNG or JPEG image'``.
    ref: str, optional
        Names the file in messages (``path`` if ``None``).

    Returns
    -------
    file object
        Binary, buffered; the caller closes it.

    Raises
    ------
    DataError
        ``'no such file'``; ``'is a folder, not a regular file; expected …'`` (or a FIFO, a device, a socket); or
        the operating system's reason, e.g. a permission denied.
    """
    path = os.fspath(path)
    ref = path if ref is None else ref
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_BINARY', 0))
    except FileNotFoundError:
        raise DataError('no such file', ref, 'missing file') from None
    except OSError as error:
        raise DataError(f'cannot be opened ({error.strerror or error})', ref, 'unreadable file') from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), 'a special file')
        raise DataError(f'is {kind}, not a regular file; expected {expected}', ref, 'not a file')
    return os.fdopen(descriptor, 'rb')


#: The bytes :func:`_read_at_most` asks for at a time. zipfile hands the decompressor as many compressed bytes as one
#: read asks for (4 KiB at least): 4 KiB of deflate give at most 4 KiB, of LZMA at most ~60 MB (of bzip2 gigabytes:
#: see :data:`_ZIP_METHODS`).
_CHUNK_BYTES = 2 ** 12


def _read_at_most(stream, limit, ref, what):
    """Read ``stream`` to its end in chunks of :data:`_CHUNK_BYTES`, refusing it as soon as more than ``limit`` bytes
    come out: the memory used is bounded by what is actually read, whatever a header said."""
    chunks, total = [], 0
    while chunk := stream.read(_CHUNK_BYTES):
        total += len(chunk)
        if total > limit:
            raise DataError(f'{what} holds more than the {limit} bytes accepted', ref, 'too large')
        chunks.append(chunk)
    return b''.join(chunks)


#: What :func:`_read_bytes` expects a dataset file to be, for the message refusing a folder, FIFO or device.
_DATASET_FILE = 'a .mat slice or a zip of them'


def _zip_members(zip_path, wanted):
    """Return ``(members, problems)``: the zip's members for which ``wanted(name)`` holds, in natural order."""
    try:
        with open_regular_file(zip_path, _DATASET_FILE) as file, zipfile.ZipFile(file) as archive:
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


#: The zip compression methods read. zipfile decompresses a bzip2 member a whole read's input at a time, without a
#: bound on what comes out (113 bytes of bzip2 are 100 MiB of zeros), so bzip2 members are refused rather than read.
_ZIP_METHODS = {zipfile.ZIP_STORED: 'stored', zipfile.ZIP_DEFLATED: 'deflate', zipfile.ZIP_LZMA: 'LZMA'}


def _read_bytes(ref):
    """The bytes of a file or zip member, at most :data:`MAX_FILE_BYTES` of them: the size a file or zip header states
    is checked first, and what actually comes out is counted as it is read (a header may under-state it)."""
    zip_path, separator, member = str(ref).partition(ZIP_SEPARATOR)
    try:
        with open_regular_file(zip_path, _DATASET_FILE, ref) as file:
            if not separator:
                size = os.fstat(file.fileno()).st_size
                if size > MAX_FILE_BYTES:
                    raise DataError(f'file is {size} bytes, more than the {MAX_FILE_BYTES} accepted', ref, 'too large')
                return _read_at_most(file, MAX_FILE_BYTES, ref, 'file')
            with zipfile.ZipFile(file) as archive:
                info = archive.getinfo(member)
                if info.file_size > MAX_FILE_BYTES:
                    raise DataError(f'zip member is {info.file_size} bytes, more than the {MAX_FILE_BYTES} accepted',
                                    ref, 'too large')
                if info.compress_type not in _ZIP_METHODS:
                    raise DataError(f'zip member is compressed with method {info.compress_type}; only '
                                    f'{", ".join(_ZIP_METHODS.values())} members are read (re-zip it with the '
                                    f'default method, deflate)', ref, 'unsupported zip method')
                with archive.open(info) as stream:
                    return _read_at_most(stream, MAX_FILE_BYTES, ref, 'zip member')
    except KeyError as error:
        raise DataError(f'the zip has no member {member!r}', ref, 'missing file') from error
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise DataError(f'cannot be read ({error})', ref, 'truncated or corrupt') from error


#: Other kinds of file by their first bytes, as ``(offset, signature, what)``, for the messages refusing them.
_SIGNATURES = (
    (0, b'\x89PNG\r\n\x1a\n', 'a PNG image'), (0, b'\xff\xd8\xff', 'a JPEG image'),
    (0, b'MATLAB', 'a MATLAB MAT-file (a Figshare slice is read from a file named *.mat)'),
    (0, _HDF5_SIGNATURE, 'an HDF5 file'), (0, b'GIF8', 'a GIF image'), (0, b'II*\x00', 'a TIFF image'),
    (0, b'MM\x00*', 'a TIFF image'), (0, b'BM', 'a BMP image'), (8, b'WEBP', 'a WebP image'),
    (128, b'DICM', 'a DICOM file'), (0, b'\x93NUMPY', 'a NumPy .npy file'), (0, b'PK\x03\x04', 'a zip file'),
    (0, b'\x1f\x8b', 'a gzip file'), (0, b'%PDF', 'a PDF document'),
)
#: How many of a file's first bytes :func:`_what_file` looks at.
_HEAD_BYTES = 132


def _what_file(head):
    """What a file is, in words, from its first :data:`_HEAD_BYTES` bytes: ``'empty (0 bytes)'``, ``'a GIF image'``,
    ``"text, starting 'hello'"`` or ``'binary, starting with the bytes 00 01 …'``."""
    if not head:
        return 'empty (0 bytes)'
    for offset, signature, what in _SIGNATURES:
        if head[offset:offset + len(signature)] == signature:
            return what
    start = head[:64]
    text = start.decode('utf-8', 'ignore')
    # 'ignore' drops at most 3 bytes of a character cut off at the end; more dropped bytes mean binary data
    if len(text.encode()) >= len(start) - 3 and all(char.isprintable() or char in '\t\n\r' for char in text):
        return f'text, starting {text[:40]!r}'
    return f'binary, starting with the bytes {head[:8].hex(" ")}'
