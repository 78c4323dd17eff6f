"""Splitting a dataset into train, validation and test: by patient, by the dataset's folds, or by file."""
import json
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm import tqdm

from lrp_brain.data.dataset import open_dataset, scan
from lrp_brain.data.figshare import image_number, read_slice
from lrp_brain.data.files import ZIP_SEPARATOR, DataError, natural_key
from lrp_brain.data.images import PATIENTS_FILE
from lrp_brain.data.slices import Slice, SliceInfo

_SPLIT_FORMAT = 'lrp-brain split'
_SPLIT_PARTS = ('train', 'val', 'test')


class PatientLeakageWarning(UserWarning):
    """A split puts slices of one patient into more than one of train, validation and test."""


def relative_ref(ref, root):
    """A slice reference relative to ``root``, with ``/`` separators (how split files store it)."""
    path, separator, member = os.fspath(ref).partition(ZIP_SEPARATOR)
    return os.path.relpath(path, root).replace(os.sep, '/') + separator + member


def absolute_ref(ref, root):
    """Undo :func:`relative_ref`."""
    path, separator, member = ref.partition(ZIP_SEPARATOR)
    return os.path.normpath(os.path.join(root, *path.split('/'))) + separator + member


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
    dataset = open_dataset(source)
    folds = dataset.folds()
    if folds is None:
        raise DataError("split method 'cvind' but no cvind.mat found", ', '.join(dataset.sources), 'cvind')
    return folds


def load_split(source, split_file=None, method='patient', seed=0, fractions=(.7, .15, .15), skip_bad=False,
               quiet=False):
    """The split every command evaluates on: reused from ``split_file`` if it exists, else made (and saved there).

    Parameters
    ----------
    source: str, os.PathLike, list of them, or a dataset
        The dataset (see :func:`lrp_brain.data.dataset.open_dataset`).
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

    Warns
    -----
    PatientLeakageWarning
        For a new split of a dataset without patient ids (an image folder without a patients CSV).
    """
    dataset = open_dataset(source)
    root = dataset.root
    if split_file is not None and os.path.exists(split_file):
        split = Split.load(split_file, root=root)
        available = set(dataset.list_files()[0])
        missing = [ref for refs in split.parts().values() for ref in refs if ref not in available]
        if missing:
            raise DataError(
                f'{len(missing)} files of the split are not in {source}, e.g. {missing[0]}', os.fspath(split_file),
                'split file',
            )
        return split
    found = scan(dataset, skip_bad=skip_bad, quiet=quiet)
    split = make_split(found.slices, method, seed, fractions, cvind=_source_cvind(dataset, method), root=root)
    split.skipped = [[problem.ref, problem.message] for problem in found.skipped]
    if not dataset.has_patients and method != 'random':
        warnings.warn(f'{root} has no patient ids ({PATIENTS_FILE}, rows file,patient): every image counts as its '
                      f'own patient, so the split is by file and images of one patient can be in train and test '
                      f'(patient leakage)', PatientLeakageWarning)
    if split_file is not None:
        split.save(split_file)
    return split
