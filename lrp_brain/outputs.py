"""Outputs that survive interruption: atomic files, and a row log a killed run resumes from.

A long job (evaluate, sweep) appends one JSON line per finished unit of work (an image, a setting) to a row log and
flushes it to disk, so a kill loses at most the line being written. On restart the complete lines are read back,
a torn last line is dropped, and only the missing units are computed. Final tables (CSV, JSON) are written
atomically: to a temporary file in the same folder, then renamed over the target, so a reader never sees half a
file.

The run's identity (arguments, data and model fingerprints, and the versions of the libraries that compute the rows)
is stored beside the log; resuming with a different identity is refused, since mixing rows of two different runs
would silently corrupt the result.

Before any work a run checks that its outputs can be written (:func:`writable_folder`) and takes its output folder
for itself (:func:`exclusive`): a second run on the same outputs is told that they are in use. Every failure of the
operating system on the way (no permission, no such folder, a file where a folder should be, a full disk) becomes
one :class:`OutputError` naming the path.
"""
import csv
import datetime
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
from contextlib import contextmanager, suppress

from lrp_brain.versions import library_versions


class ResumeError(ValueError):
    """A run cannot resume: its output folder holds a run with different arguments or inputs."""


class OutputError(ValueError):
    """An output cannot be written: the path, and what the operating system said (or that another run holds it)."""


def _not_a_folder(path):
    """The first of ``path`` and its parents that exists, if it is not a folder; ``None`` if it is one."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def _reason(error, path):
    """An :class:`OSError` met while writing at ``path``, in words: the file in the way of a folder, or the operating
    system's message with the path it concerns."""
    blocking = _not_a_folder(path) if isinstance(error, (FileExistsError, NotADirectoryError)) else None
    if blocking is not None:
        return f'{blocking} exists and is not a folder'
    reason = error.strerror or str(error) or type(error).__name__
    concerned = os.fspath(error.filename) if error.filename is not None else None
    return reason + (f' ({concerned})' if concerned and concerned != os.fspath(path) else '')


def writable_folder(folder):
    """Create ``folder`` (and its parents) if needed and check that files can be written in it: a probe file is
    created, written, synced to disk and removed. Return the folder.

    Raises
    ------
    OutputError
        ``cannot write the output folder FOLDER: REASON`` (no permission, a read-only or full file system, a file or
        device where a folder should be, a folder that cannot exist, e.g. under ``/proc``).
    """
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix='.write-probe.')
        try:
            os.write(handle, b'lrp-brain write probe\n')
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        raise OutputError(f'cannot write the output folder {folder}: {_reason(error, folder)}') from None
    return folder


def check_output_file(path):
    """Refuse to write over something that is not a regular file: a rename over a device (``/dev/null``), a pipe or
    a folder would replace it."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OutputError(f'cannot write {path}: it exists and is not a regular file (a folder, device or pipe); '
                          f'choose another output')


@contextmanager
def exclusive(lock_path, what):
    """Hold the lock file ``lock_path`` for the body, so that a second run on the same outputs is refused.

    The folder of the lock file is checked writable first (:func:`writable_folder`). The lock is an ``flock`` on the
    file, which the operating system releases when the process ends, however it ends: a killed run never blocks the
    run that resumes it. The file is removed on exit (while still locked; a run that opened it meanwhile notices and
    takes a fresh one).

    Parameters
    ----------
    lock_path: str or os.PathLike
        E.g. ``<out>/.lock``.
    what: str
        What the lock protects, for the message (the output folder or file).

    Raises
    ------
    OutputError
        ``WHAT is in use by another run (process PID on HOST since TIME); wait until it ends, or choose another
        output``, or the output cannot be written.
    """
    lock_path = os.fspath(lock_path)
    writable_folder(os.path.dirname(os.path.abspath(lock_path)))
    handle = _take_lock(lock_path, what)
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(lock_path)
        os.close(handle)


def _take_lock(lock_path, what):
    """Open and ``flock`` ``lock_path``; write who holds it into it; return the descriptor."""
    while True:
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise OutputError(f'cannot write the lock file {lock_path}: {_reason(error, lock_path)}') from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode('utf-8', 'replace').strip() or 'unknown process'
            os.close(handle)
            raise OutputError(f'{what} is in use by another run ({holder}); wait until it ends, or choose another '
                              f'output') from None
        except OSError as error:
            os.close(handle)
            raise OutputError(f'cannot lock {lock_path}: {_reason(error, lock_path)}') from None
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(handle)
        if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            break
        os.close(handle)  # its holder removed it after we opened it: take the file that is there now
    since = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f'process {os.getpid()} on {socket.gethostname()} since {since}\n'.encode())
    except OSError as error:
        os.close(handle)
        raise OutputError(f'cannot write the lock file {lock_path}: {_reason(error, lock_path)}') from None
    return handle


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    Raises
    ------
    OutputError
        Naming ``path``, for any failure of the operating system, or where ``path`` is a folder, device or pipe.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    check_output_file(path)
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's mode
        with os.fdopen(handle, 'wb') as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise OutputError(f'cannot write {path}: {_reason(error, path)}') from None
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text):
    """Write the string ``text`` to ``path`` atomically, UTF-8 encoded."""
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + '\n')


def atomic_write_csv(path, rows, fieldnames=None):
    """Write a list of dicts as CSV to ``path`` atomically; columns are ``fieldnames`` or the first row's keys."""
    buffer = io.StringIO()
    fieldnames = list(fieldnames or (rows[0].keys() if rows else []))
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _json_default(value):
    if hasattr(value, 'tolist'):
        return value.tolist()
    if hasattr(value, '__fspath__'):
        return os.fspath(value)
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def file_fingerprint(path, chunk_size=1 << 20):
    """Return the SHA-256 of a file's bytes (hex), e.g. to identify a checkpoint."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()


def text_fingerprint(items):
    """Return the SHA-256 (hex) of an iterable of strings, e.g. the list of data files a run reads."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(str(item).encode('utf-8') + b'\0')
    return digest.hexdigest()


class RowLog:
    """An append-only log of result rows, keyed, that a killed run resumes from.

    Parameters
    ----------
    path: str or os.PathLike
        The log file (JSON lines). Its identity is stored in ``path + '.run.json'``.
    identity: dict
        What makes two runs the same: arguments, data and model fingerprints; the library versions
        (:func:`lrp_brain.versions.library_versions`) are added as ``'versions'``. A log written under another
        identity is refused with :class:`ResumeError`.
    key: str
        The row field that identifies a unit of work (e.g. ``'path'`` or ``'setting'``). Rows read back are
        de-duplicated by it (the first complete row wins).
    """
    def __init__(self, path, identity, key):
        self.path = os.fspath(path)
        self.key = key
        identity = {**identity, 'versions': library_versions()}
        self.identity = json.loads(json.dumps(identity, default=_json_default))
        self.rows = {}
        identity_path = self.path + '.run.json'
        if os.path.exists(identity_path):
            with open(identity_path, encoding='utf-8') as file:
                stored = json.load(file)
            if stored != self.identity:
                changed = sorted(
                    name for name in set(stored) | set(self.identity) if stored.get(name) != self.identity.get(name)
                )
                raise ResumeError(
                    f'{os.path.dirname(self.path) or "."} holds an unfinished run with different '
                    f'{", ".join(changed)}; use another output folder, or delete {self.path} and {identity_path} '
                    f'to start over'
                )
            self._read()
        else:
            atomic_write_json(identity_path, self.identity)
            atomic_write_text(self.path, '')

    def _read(self):
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding='utf-8') as file:
            for line in file:
                if not line.endswith('\n'):
                    break  # a torn last line from a kill: dropped, its unit is recomputed
                row = json.loads(line)
                self.rows.setdefault(row[self.key], row)
        # rewrite without a torn tail, so the next append starts on a fresh line
        atomic_write_text(self.path, ''.join(json.dumps(row) + '\n' for row in self.rows.values()))

    def __contains__(self, key):
        return key in self.rows

    def __len__(self):
        return len(self.rows)

    def append(self, row):
        """Add a finished row: written and flushed to disk before this returns."""
        row = json.loads(json.dumps(row, default=_json_default))
        if row[self.key] in self.rows:
            return
        try:
            with open(self.path, 'a', encoding='utf-8') as file:
                file.write(json.dumps(row) + '\n')
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            raise OutputError(f'cannot write {self.path}: {_reason(error, self.path)}') from None
        self.rows[row[self.key]] = row

    def ordered(self, keys):
        """Return the rows for ``keys`` in that order (all must be present)."""
        return [self.rows[key] for key in keys]
