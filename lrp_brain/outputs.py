"""Outputs that survive interruption: atomic files, and a row log a killed run resumes from.

A long job (evaluate, sweep) appends one JSON line per finished unit of work (an image, a setting) to a row log and
flushes it to disk, so a kill loses at most the line being written. On restart the complete lines are read back,
a torn last line is dropped, and only the missing units are computed. Final tables (CSV, JSON) are written
atomically: to a temporary file in the same folder, then renamed over the target, so a reader never sees half a
file.

The run's identity (arguments, data and model fingerprints, and the versions of the libraries that compute the rows)
is stored beside the log; resuming with a different identity is refused, since mixing rows of two different runs
would silently corrupt the result.
"""
import csv
import hashlib
import io
import json
import os
import tempfile

from lrp_brain.versions import library_versions


class ResumeError(ValueError):
    """A run cannot resume: its output folder holds a run with different arguments or inputs."""


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's mode
        with os.fdopen(handle, 'wb') as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
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
        with open(self.path, 'a', encoding='utf-8') as file:
            file.write(json.dumps(row) + '\n')
            file.flush()
            os.fsync(file.fileno())
        self.rows[row[self.key]] = row

    def ordered(self, keys):
        """Return the rows for ``keys`` in that order (all must be present)."""
        return [self.rows[key] for key in keys]
