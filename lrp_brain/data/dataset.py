"""A dataset of either format: finding its format, scanning it once, and the torch dataset that reads its slices for
a model."""
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lrp_brain.data.figshare import FigshareDataset, read_slice
from lrp_brain.data.files import DataError, Problem, listed_or_refused, natural_key
from lrp_brain.data.images import PATIENTS_FILE, ImageFolder, is_image_folder
from lrp_brain.data.slices import CLASS_NAMES
from lrp_brain.data.transform import Transform


def open_dataset(source):
    """The dataset of ``source`` in its format: an :class:`~lrp_brain.data.images.ImageFolder` for a folder of
    PNG/JPEG images (and no ``.mat`` file or zip), else a :class:`~lrp_brain.data.figshare.FigshareDataset`; a
    dataset passes through as it is."""
    if isinstance(source, (FigshareDataset, ImageFolder)):
        return source
    if is_image_folder(source):
        return ImageFolder.open(source)
    return FigshareDataset(source)


def check_class_names(dataset, class_names):
    """Refuse a model whose classes, ``class_names`` by output, are not the dataset's (the same names in the same
    order): its outputs would be read as the wrong classes. The message shows both lists."""
    if tuple(class_names) != tuple(dataset.class_names):
        raise DataError(f"the model's classes ({', '.join(class_names)}) are not the data's "
                        f"({', '.join(dataset.class_names)}), in this order; use a model of the data's classes (an "
                        f"imported one: lrp-brain import --classes {','.join(dataset.class_names)})",
                        ', '.join(dataset.sources), 'class names')


def find_files(source, skip_bad=False):
    """The slice references of a dataset of either format, in natural order (see :func:`open_dataset`); a problem
    found while listing raises its :class:`DataError`, or with ``skip_bad`` is left out with a warning."""
    return listed_or_refused(*open_dataset(source).list_files(), skip_bad)


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
        Files left out (``fatal``) and findings that are only flagged (empty masks, patients with two classes, a
        dataset without patient ids).
    class_names: tuple of str
        The dataset's class names.
    has_patients: bool
        Whether the dataset knows its patients (an image folder without a patients CSV does not).
    """
    root: str
    slices: list
    problems: list
    class_names: tuple = CLASS_NAMES
    has_patients: bool = True

    @property
    def skipped(self):
        """The problems that left a file out."""
        return [problem for problem in self.problems if problem.fatal]


def scan(source, skip_bad=False, quiet=False):
    """Read every slice of a dataset once, checking it.

    Parameters
    ----------
    source: str, os.PathLike, list of them, or a dataset
        See :func:`open_dataset`.
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
    dataset = open_dataset(source)
    refs, problems = dataset.list_files()
    if problems and not skip_bad:
        raise problems[0].error()
    slices, first_by_digest = [], {}
    for ref in tqdm(refs, desc='reading slices', unit='slice', disable=quiet):
        try:
            info = dataset.read(ref).info()
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
            problems.append(Problem(ref, f'{dataset.mask_field} is empty (allowed)', 'empty mask', fatal=False))
    labels_by_patient = defaultdict(set)
    for info in slices:
        labels_by_patient[info.patient].add(info.class_name)
    for patient, names in sorted(labels_by_patient.items(), key=lambda item: natural_key(item[0])):
        if len(names) > 1:
            problems.append(Problem(
                f'patient {patient}', f'slices of {len(names)} classes ({", ".join(sorted(names))})',
                'patient with several classes', fatal=False,
            ))
    if not dataset.has_patients:
        problems.append(Problem(
            dataset.root, f'no patient ids ({PATIENTS_FILE}): every image counts as its own patient, so a split is by '
                          f'file and images of one patient can be in train and test', 'no patient ids', fatal=False,
        ))
    return Scan(dataset.root, slices, problems, dataset.class_names, dataset.has_patients)


def summarise_problems(problems):
    """One line counting problems by kind, e.g. ``'3 files: 2 not a MAT-file, 1 label outside {1, 2, 3}'``."""
    counts = Counter(problem.kind for problem in problems)
    details = ', '.join(f'{count} {kind}' for kind, count in counts.most_common())
    return f'{len(problems)} file{"s" if len(problems) != 1 else ""}' + (f': {details}' if details else '')


class SliceDataset(torch.utils.data.Dataset):
    """A torch dataset of slices, read lazily from disk and preprocessed by a :class:`Transform`.

    Parameters
    ----------
    refs: list of str
        Slice references (see :func:`find_slices`, :class:`Split`).
    transform: Transform
        The preprocessing.
    read: callable
        Reads one reference into a :class:`~lrp_brain.data.slices.Slice`: :func:`read_slice` (Figshare) by default,
        a dataset's ``read`` (see :func:`open_dataset`).

    Items are dicts: ``'image'`` (3, S, S) float32, ``'mask'`` (S, S) float32 (``None`` for an image without a
    mask), ``'label'`` int, ``'patient'`` str,
    ``'path'`` str (the reference) and ``'index'`` int (the position in ``refs``). A bad file raises
    :class:`DataError` when its item is read.
    """
    def __init__(self, refs, transform=None, read=read_slice):
        self.refs = [os.fspath(ref) for ref in refs]
        self.transform = transform if transform is not None else Transform()
        self.read = read

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, index):
        item = self.read(self.refs[index])
        image, mask = self.transform(item.image, item.mask, full_scale=item.full_scale)
        return {'image': image, 'mask': mask, 'label': item.label, 'patient': item.patient, 'path': item.path,
                'index': index}
