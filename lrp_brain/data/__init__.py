"""The data: brain-MRI slices read from their files, preprocessed and split, one module per concern.

* :mod:`~lrp_brain.data.files` — bounded reading of files and zip members, :class:`DataError`, what a file is;
* :mod:`~lrp_brain.data.slices` — :class:`Slice`, what every format's reader returns;
* :mod:`~lrp_brain.data.figshare` — the Figshare ``.mat`` slices (Cheng et al.) and their ``cvind`` folds;
* :mod:`~lrp_brain.data.images` — PNG and JPEG images, and folders of them with one subfolder per class;
* :mod:`~lrp_brain.data.dataset` — a dataset of either format: scanning it, the torch dataset of its slices;
* :mod:`~lrp_brain.data.transform` — :class:`Transform`, the preprocessing between a slice and the model's input;
* :mod:`~lrp_brain.data.splits` — train / validation / test splits, by patient, by fold or by file;
* :mod:`~lrp_brain.data.report` — :func:`check_dataset`, what ``lrp-brain data`` prints.

The names below are re-exported here, so ``from lrp_brain.data import ...`` reaches every one of them.
"""
from lrp_brain.data.dataset import (
    Scan, SliceDataset, check_class_names, find_files, open_dataset, scan, summarise_problems,
)
from lrp_brain.data.figshare import (
    MAX_ARRAY_BYTES, MAX_PID_LENGTH, FigshareDataset, find_cvind, find_slices, image_number, read_cvind, read_slice,
)
from lrp_brain.data.files import (
    MAX_FILE_BYTES, MAX_SIDE, ZIP_SEPARATOR, DataError, Problem, dataset_root, natural_key, open_regular_file,
)
from lrp_brain.data.images import (
    IMAGE_SUFFIXES, MASKS_FOLDER, PATIENTS_FILE, ImageFolder, is_image_folder, read_image, read_image_file,
)
from lrp_brain.data.report import DatasetReport, check_dataset
from lrp_brain.data.slices import CLASS_NAMES, Slice, SliceInfo
from lrp_brain.data.splits import (
    PatientLeakageWarning, Split, absolute_ref, load_split, make_split, relative_ref, shared_patients,
)
from lrp_brain.data.transform import Transform

__all__ = [
    'Scan', 'SliceDataset', 'check_class_names', 'find_files', 'open_dataset', 'scan', 'summarise_problems',
    'MAX_ARRAY_BYTES', 'MAX_PID_LENGTH', 'FigshareDataset', 'find_cvind', 'find_slices', 'image_number', 'read_cvind',
    'read_slice', 'MAX_FILE_BYTES', 'MAX_SIDE', 'ZIP_SEPARATOR', 'DataError', 'Problem', 'dataset_root',
    'natural_key', 'open_regular_file', 'IMAGE_SUFFIXES', 'MASKS_FOLDER', 'PATIENTS_FILE', 'ImageFolder',
    'is_image_folder', 'read_image', 'read_image_file', 'DatasetReport', 'check_dataset', 'CLASS_NAMES', 'Slice',
    'SliceInfo', 'PatientLeakageWarning', 'Split', 'absolute_ref', 'load_split', 'make_split', 'relative_ref',
    'shared_patients', 'Transform',
]
