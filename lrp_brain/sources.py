"""Opening what every command works on: a model with its metadata and preprocessing, and a dataset split.

The model and the data come from files the user names, or, when none is named, from the bundled demo model and a
phantom set generated in the cache folder, so every command runs on a fresh machine.
"""
import os
from dataclasses import dataclass, replace

import torch

from lrp_brain import distributed
from lrp_brain.composites import zbox_bounds
from lrp_brain.data import (CLASS_NAMES, SliceDataset, Transform, check_class_names, load_split, open_dataset,
                            relative_ref)
from lrp_brain.model import DEMO_MODEL_PATH, load_checkpoint, load_demo_model
from lrp_brain.outputs import file_fingerprint, text_fingerprint
from lrp_brain.phantom import phantom_dataset

#: The phantom set used when no data is given: a seed the demo model was not trained on.
DEFAULT_PHANTOMS = {'n': 300, 'seed': 1}


@dataclass
class Source:
    """A model with its metadata, and the dataset split it is evaluated on (``data`` and ``split`` are ``None`` for a
    model opened alone by :func:`open_model`).

    Attributes
    ----------
    model: torch.nn.Module
    meta: dict
        The checkpoint metadata (class names, input transform, ...).
    model_id: str
        What identifies the weights: the checkpoint file's SHA-256, prefixed by its kind.
    data: str
        The dataset folder/zip.
    split: lrp_brain.data.Split
    transform: lrp_brain.data.Transform
        The model's preprocessing (its size possibly overridden).
    reader: lrp_brain.data.FigshareDataset or lrp_brain.data.ImageFolder
        The dataset in its format (see :func:`lrp_brain.data.open_dataset`): what reads its slices, and whether they
        have masks.
    """
    model: torch.nn.Module
    meta: dict
    model_id: str
    data: str
    split: object
    transform: Transform
    reader: object = None

    @property
    def class_names(self):
        return list(self.meta.get('class_names') or CLASS_NAMES)

    @property
    def bounds(self):
        """The z^B bounds ``(low, high)`` that follow from the transform."""
        return zbox_bounds(self.transform)

    def bounds_record(self):
        """The z^B bounds as ``{'low': ..., 'high': ...}`` of numbers or lists, as outputs record them."""
        return {name: bound.flatten().tolist() if isinstance(bound, torch.Tensor) else bound
                for name, bound in zip(('low', 'high'), self.bounds)}

    def dataset(self, part):
        """The :class:`~lrp_brain.data.SliceDataset` of split part ``'train'``, ``'val'`` or ``'test'``."""
        return SliceDataset(getattr(self.split, part), self.transform, self.reader.read)

    @property
    def has_masks(self):
        """Whether the data has tumour masks (an image folder may have none: then only faithfulness is scored)."""
        return self.reader.has_masks

    def data_id(self, part):
        """A fingerprint of the files of split part ``part`` (their names relative to the dataset and sizes)."""
        refs = getattr(self.split, part)
        return text_fingerprint(
            f'{relative_ref(ref, self.split.root)}:{_file_size(ref)}' for ref in refs
        )


def _file_size(ref):
    path = ref.split('::')[0]
    return os.path.getsize(path) if os.path.exists(path) else -1


def open_source(checkpoint=None, data=None, split_file=None, split_method='patient', split_seed=0, size=None,
                quiet=False):
    """Load the model and the split of the data that every command works on.

    Parameters
    ----------
    checkpoint: str, optional
        An lrp-brain checkpoint or a bare torchvision VGG state dict; the bundled demo model if ``None``.
    data: str, optional
        A Figshare dataset (folder, zip or .mat) or an image folder (see :mod:`lrp_brain.data.images`); a phantom
        set in the cache folder if ``None``.
    split_file: str, optional
        The split JSON to reuse (made and saved there if missing). Without it, the split is made afresh with
        ``split_method`` and ``split_seed`` (deterministic).
    split_method, split_seed:
        See :func:`lrp_brain.data.make_split`.
    size: int, optional
        Override the input size of the model's transform.
    quiet: bool
        Hide progress bars.

    Returns
    -------
    Source

    Raises
    ------
    DataError
        Besides the data's own problems: a model whose class names are not the data's (both lists shown).
    """
    source = open_model(checkpoint, size)
    with distributed.main_first():  # under torchrun, rank 0 writes the phantoms and the split file, the rest read
        if data is None:
            data = phantom_dataset(**DEFAULT_PHANTOMS, quiet=quiet or not distributed.is_main())
        reader = open_dataset(data)
        check_class_names(reader, source.class_names)
        split = load_split(reader, split_file=split_file, method=split_method, seed=split_seed,
                           quiet=quiet or not distributed.is_main())
    return replace(source, data=os.fspath(data), split=split, reader=reader)


def open_model(checkpoint=None, size=None):
    """Load a model with its metadata and preprocessing, without data (see :func:`open_source`).

    Parameters
    ----------
    checkpoint: str, optional
        An lrp-brain checkpoint or a bare torchvision VGG state dict; the bundled demo model if ``None``.
    size: int, optional
        Override the input size of the model's transform.

    Returns
    -------
    Source
        With ``data`` and ``split`` ``None``.
    """
    if checkpoint is None:
        model, meta = load_demo_model()
        model_id = 'demo:' + file_fingerprint(DEMO_MODEL_PATH)
    else:
        model, meta = load_checkpoint(checkpoint)
        model_id = 'checkpoint:' + file_fingerprint(checkpoint)
    transform = Transform.from_dict(meta['transform'])
    if size is not None:
        transform = Transform.from_dict({**transform.to_dict(), 'size': int(size)})
    return Source(model, meta, model_id, None, None, transform)
