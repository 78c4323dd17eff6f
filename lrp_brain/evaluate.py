"""How well relevance maps land on the tumour, over a dataset split: the loop behind ``lrp-brain evaluate``.

For every image of a split the model is explained (LRP with :class:`~lrp_brain.composites.VGGComposite`, or a
baseline), the map is scored against the tumour mask with :func:`lrp_brain.metrics.evaluate_maps`, and one row is
written per image. The summary holds means, standard deviations and bootstrap confidence intervals, overall and per
class, and counts the images left out of each mean and why. A killed run resumes from its row log (see
:mod:`lrp_brain.outputs`); the result does not depend on where it was interrupted.

The model and the data come from files the user names, or, when none is named, from the bundled demo model and a
phantom set generated in the cache folder, so every command runs on a fresh machine.

The last section explains single files instead of a split (``lrp-brain explain``): Figshare ``.mat`` slices, PNG or
JPEG images, slices of a dataset by position, or, given none, one phantom slice per class.
"""
import io
import math
import os
from dataclasses import dataclass, field, replace
from numbers import Integral

import numpy as np
import torch
from tqdm import tqdm

from lrp_brain import distributed, metrics
from lrp_brain.composites import zbox_bounds
from lrp_brain.data import (CLASS_NAMES, MAX_SIDE, ZIP_SEPARATOR, DataError, SliceDataset, Transform, find_slices,
                            load_split, read_slice, relative_ref)
from lrp_brain.explain import ExplainError, explain, explain_all_classes
from lrp_brain.model import load_checkpoint, load_demo_model
from lrp_brain.outputs import (atomic_write_bytes, atomic_write_csv, atomic_write_json, file_fingerprint,
                               text_fingerprint)
from lrp_brain.phantom import phantom_dataset
from lrp_brain.versions import library_versions

#: The metrics of every row, in column order (see :func:`lrp_brain.metrics.evaluate_maps`).
METRICS = ('iou', 'precision', 'recall', 'f1', 'pixel_accuracy', 'pointing_game', 'mass_accuracy', 'rank_accuracy')

#: Flags of every row: why an image may be left out of a metric's mean.
FLAGS = ('empty_mask', 'empty_selection', 'no_positive')

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
    """
    model: torch.nn.Module
    meta: dict
    model_id: str
    data: str
    split: object
    transform: Transform

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
        return SliceDataset(getattr(self.split, part), self.transform)

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
        A Figshare dataset (folder, zip or .mat); a phantom set in the cache folder if ``None``.
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
    """
    source = open_model(checkpoint, size)
    with distributed.main_first():  # under torchrun, rank 0 writes the phantoms and the split file, the rest read
        if data is None:
            data = phantom_dataset(**DEFAULT_PHANTOMS, quiet=quiet or not distributed.is_main())
        split = load_split(data, split_file=split_file, method=split_method, seed=split_seed,
                           quiet=quiet or not distributed.is_main())
    return replace(source, data=os.fspath(data), split=split)


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
        from lrp_brain.model import DEMO_MODEL_PATH
        model_id = 'demo:' + file_fingerprint(DEMO_MODEL_PATH)
    else:
        model, meta = load_checkpoint(checkpoint)
        model_id = 'checkpoint:' + file_fingerprint(checkpoint)
    transform = Transform.from_dict(meta['transform'])
    if size is not None:
        transform = Transform.from_dict({**transform.to_dict(), 'size': int(size)})
    return Source(model, meta, model_id, None, None, transform)


def _batch(dataset, indices):
    items = [dataset[index] for index in indices]
    return {
        'image': torch.stack([item['image'] for item in items]),
        'mask': torch.stack([item['mask'] for item in items]),
        'label': torch.tensor([item['label'] for item in items]),
        'patient': [item['patient'] for item in items],
        'path': [item['path'] for item in items],
    }


def score_rows(batch, explanation, quantile, class_names, root):
    """Turn one explained batch into per-image rows: file, patient, label, prediction, probabilities, metrics."""
    scores = metrics.evaluate_maps(explanation.relevance, batch['mask'], quantile, names=batch['path'])
    rows = []
    for index, path in enumerate(batch['path']):
        label = int(batch['label'][index])
        row = {
            'file': relative_ref(path, root),
            'patient': batch['patient'][index],
            'label': class_names[label],
            'prediction': class_names[int(explanation.predictions[index])],
            'target': class_names[int(explanation.targets[index])],
            **{f'p_{name}': float(explanation.probabilities[index, position])
               for position, name in enumerate(class_names)},
            **{name: float(scores[name][index]) for name in METRICS},
            **{name: bool(scores[name][index]) for name in FLAGS},
        }
        rows.append(row)
    return rows


def summarize_rows(rows, class_names, seed=0):
    """Means, standard deviations and 95 % bootstrap intervals of every metric, overall and per class.

    NaN values (metrics undefined for an image, see :mod:`lrp_brain.metrics`) are left out and counted; ``excluded``
    says how many images were left out of each mean and the flags why.
    """
    classes = torch.tensor([class_names.index(row['label']) for row in rows], dtype=torch.long)
    summary = {
        name: metrics.summarize(
            torch.tensor([row[name] for row in rows], dtype=torch.float64), classes, class_names, seed=seed
        ) for name in METRICS
    }
    summary['images'] = len(rows)
    summary['flags'] = {name: sum(row[name] for row in rows) for name in FLAGS}
    summary['accuracy'] = (sum(row['label'] == row['prediction'] for row in rows) / len(rows)) if rows else math.nan
    return summary


def evaluate(source, part='test', *, method='lrp', epsilon=0.25, gamma=0.1, quantile=0.9, target='label',
             batch_size=8, device='cpu', out=None, composite_kwargs=None, progress=True, figures=0):
    """Explain every image of a split, score each map against its tumour mask, and summarise.

    Parameters
    ----------
    source: Source
        Model and data (see :func:`open_source`).
    part: str
        The split part: ``'test'`` (default), ``'val'`` or ``'train'``.
    method: str
        ``'lrp'``, ``'gradient'``, ``'gradxinput'`` or ``'zennit-egb'`` (see :func:`lrp_brain.explain.explain`).
    epsilon, gamma: float
        The LRP parameters (``method='lrp'``).
    quantile: float
        The relevance mask keeps the pixels above this quantile (0.9: the top 10 %).
    target: str or int
        ``'label'`` (the true class, as in the study), ``'pred'`` or a class index.
    batch_size: int
    device: str or torch.device
    out: str, optional
        Folder for ``rows.csv``, ``summary.json`` (and the row log a killed run resumes from); nothing is written if
        ``None``.
    composite_kwargs: dict, optional
        More :class:`~lrp_brain.composites.VGGComposite` options.
    progress: bool
        Show a progress bar over images.
    figures: int
        With ``out``, draw the four-panel figure of the ``figures`` best and worst images by IoU.

    Returns
    -------
    rows: list of dict
        One per image, in split order.
    summary: dict
        See :func:`summarize_rows`, plus ``'settings'``, ``'model'``, ``'data'`` and ``'versions'``.
    """
    dataset = source.dataset(part)
    low, high = source.bounds
    settings = {
        'method': method, 'epsilon': epsilon, 'gamma': gamma, 'quantile': quantile, 'target': target,
        'split': part, **source.bounds_record(), 'input_size': source.transform.size,
        'composite_kwargs': composite_kwargs or {},
    }
    identity = {'settings': settings, 'batch_size': int(batch_size), 'model': source.model_id,
                'data': source.data_id(part)}
    keys = [relative_ref(ref, source.split.root) for ref in dataset.refs]

    def compute(indices):
        batch = _batch(dataset, indices)
        explanation = explain(
            source.model, batch['image'], target=target, labels=batch['label'], method=method, epsilon=epsilon,
            gamma=gamma, low=low, high=high, batch_size=batch_size, device=device, composite_kwargs=composite_kwargs,
        )
        return score_rows(batch, explanation, quantile, source.class_names, source.split.root)

    rows = distributed.batch_rows(keys, batch_size, compute, identity=identity, progress=progress,
                                  log_path=None if out is None else os.path.join(out, 'rows.jsonl'),
                                  description=f'evaluate {part}')
    summary = {
        **summarize_rows(rows, source.class_names), 'settings': settings, 'model': source.model_id,
        'data': {'source': source.data, 'split_method': source.split.method, 'split_seed': source.split.seed,
                 'part': part, 'fingerprint': identity['data']},
        'versions': library_versions(), 'processes': distributed.world_size(),
    }
    if out is not None:
        distributed.on_main(lambda: _write_outputs(
            source, dataset, rows, summary, out, figures, method=method, epsilon=epsilon, gamma=gamma,
            quantile=quantile, target=target, device=device, composite_kwargs=composite_kwargs,
        ))
    return rows, summary


def _write_outputs(source, dataset, rows, summary, out, figures, **options):
    atomic_write_csv(os.path.join(out, 'rows.csv'), rows)
    atomic_write_json(os.path.join(out, 'summary.json'), summary)
    if figures:
        draw_figures(source, dataset, rows, out, figures, **options)


def draw_figures(source, dataset, rows, out, count, *, method, epsilon, gamma, quantile, target, device,
                 composite_kwargs=None):
    """Draw the four-panel figure (image, mask, relevance, relevance mask with IoU) of the best and worst images."""
    from lrp_brain.figures import four_panel, select_images

    low, high = source.bounds
    iou = torch.tensor([row['iou'] for row in rows], dtype=torch.float64)
    paths = []
    for mode in ('best', 'worst'):
        for rank, index in enumerate(select_images(iou, k=count, mode=mode)):
            item = dataset[int(index)]
            explanation = explain(
                source.model, item['image'][None], target=target, labels=torch.tensor([item['label']]),
                method=method, epsilon=epsilon, gamma=gamma, low=low, high=high, device=device,
                composite_kwargs=composite_kwargs,
            )
            relevance = explanation.relevance[0]
            row = rows[int(index)]
            paths.append(four_panel(
                os.path.join(out, 'figures', f'{mode}{rank + 1}.png'), item['image'][0], item['mask'], relevance,
                metrics.relevance_mask(relevance[None], quantile)[0], row['iou'],
                title=f'{row["file"]}: {row["label"]}, predicted {row["prediction"]}',
            ))
    return paths


# --- explaining single files: the loop behind ``lrp-brain explain`` ----------------------------------------------

#: The phantoms ``lrp-brain explain`` shows when given no input: the first slice of each class of a small set with
#: the held-out seed of :data:`DEFAULT_PHANTOMS`. Writing the default set and scanning it for its split takes about a
#: minute on two CPU cores, longer than the command may take; these slices are written in a few seconds.
EXPLAIN_PHANTOMS = {'n': 24, 'seed': DEFAULT_PHANTOMS['seed']}

#: Suffixes of the image files read besides Figshare ``.mat`` slices.
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')

#: What the target of :func:`explain_inputs` may be besides a class index or name.
FILE_TARGETS = ('label', 'pred', 'all')


@dataclass
class InputImage:
    """One image to explain, preprocessed as the model expects.

    Attributes
    ----------
    name: str
        Names its output files (``<name>.png``, ``<name>.npy``, ...).
    path: str
        The file, or slice reference (``archive.zip::member.mat``).
    image: torch.Tensor
        ``(3, S, S)``, the model's input.
    mask: torch.Tensor or None
        ``(S, S)`` tumour mask of 0 and 1; ``None`` for an image file.
    label: int or None
        The true class; ``None`` for an image file.
    patient: str or None
    """
    name: str
    path: str
    image: torch.Tensor
    mask: object
    label: object
    patient: object


def _stem(ref):
    """``'dir/7.mat'`` and ``'a.zip::data/7.mat'`` → ``'7'``."""
    return os.path.splitext(os.path.basename(os.fspath(ref).split(ZIP_SEPARATOR)[-1]))[0]


def _slice_input(item, transform, name=None):
    image, mask = transform(item.image, item.mask)
    return InputImage(name or _stem(item.path), item.path, image, mask, item.label, item.patient)


def read_image_file(path):
    """Read a PNG or JPEG image as one grey channel, the mean of its colour channels (an alpha channel is dropped).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float64, in the file's own value range.

    Raises
    ------
    DataError
        Naming the file: missing, unreadable, or not a 2-D grey or colour image with sides of 2 to ``MAX_SIDE``.
    """
    from skimage.io import imread

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError('no such file', path, 'missing file')
    try:
        pixels = np.asarray(imread(path))
    except (OSError, ValueError, SyntaxError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f'cannot be read as an image ({reason})', path, 'unreadable image') from None
    if pixels.ndim == 3 and pixels.shape[-1] in (2, 4):
        pixels = pixels[..., :-1]  # grey + alpha, RGB + alpha
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3):
        pixels = pixels.mean(axis=-1)
    if pixels.ndim != 2 or not all(2 <= side <= MAX_SIDE for side in pixels.shape):
        raise DataError(f'image has shape {pixels.shape}; expected a grey or colour image with sides from 2 to '
                        f'{MAX_SIDE}', path, 'wrong shape')
    if not np.isfinite(pixels).all():
        raise DataError('image holds NaN or infinite values', path, 'invalid values')
    return pixels.astype(np.float64)


def read_input(path, transform):
    """Read and preprocess one file to explain: a Figshare ``.mat`` slice (with mask and label) or a PNG/JPEG image.

    Parameters
    ----------
    path: str or os.PathLike
        The file, or a zip member as ``'archive.zip::member.mat'``.
    transform: lrp_brain.data.Transform
        The model's preprocessing (min-max to its value range, resize, 3 channels).

    Returns
    -------
    InputImage

    Raises
    ------
    DataError
        Naming the file: an unknown suffix, or a file that cannot be read (see :func:`lrp_brain.data.read_slice` and
        :func:`read_image_file`).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path.split(ZIP_SEPARATOR)[-1])[1].lower()
    if suffix == '.mat':
        return _slice_input(read_slice(path), transform)
    if suffix in IMAGE_SUFFIXES:
        image, _ = transform(read_image_file(path))
        return InputImage(_stem(path), path, image, None, None, None)
    raise DataError(f'cannot explain a file of type {suffix or "(no suffix)"!r}: give a Figshare .mat slice or a '
                    f'{"/".join(IMAGE_SUFFIXES)} image', path, 'unknown format')


def dataset_inputs(data, indices, transform):
    """Read slices of a dataset by their position in its file order (:func:`lrp_brain.data.find_slices`; ``0`` is
    ``1.mat`` of a complete Figshare folder)."""
    refs = find_slices(data)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, Integral) or not 0 <= index < len(refs):
            raise DataError(f'slice index {index!r} is outside the {len(refs)} slices (0 .. {len(refs) - 1})',
                            os.fspath(data), 'index')
    return [_slice_input(read_slice(refs[index]), transform) for index in indices]


def demo_inputs(transform, quiet=False):
    """One phantom slice per class, the first of each in file order, of the :data:`EXPLAIN_PHANTOMS` set (written
    to the cache folder on first use); each is named ``<class>-<file stem>``."""
    chosen = {}
    for ref in find_slices(phantom_dataset(**EXPLAIN_PHANTOMS, quiet=quiet)):
        item = read_slice(ref)
        chosen.setdefault(item.label, item)
        if len(chosen) == len(CLASS_NAMES):
            break
    return [_slice_input(item, transform, f'{item.class_name}-{_stem(item.path)}')
            for _, item in sorted(chosen.items())]


def gather_inputs(transform, paths=(), data=None, indices=(), quiet=False):
    """The images ``lrp-brain explain`` works on: the files ``paths``, the slices ``indices`` of ``data``, or, given
    neither, :func:`demo_inputs`. Repeated names get ``-2``, ``-3``, ... so no output overwrites another.

    Returns
    -------
    list of InputImage
    """
    if not paths and data is None:
        return demo_inputs(transform, quiet)
    inputs = [read_input(path, transform) for path in paths]
    if data is not None:
        inputs += dataset_inputs(data, indices, transform)
    seen = {}
    for position, item in enumerate(inputs):
        seen[item.name] = seen.get(item.name, 0) + 1
        if seen[item.name] > 1:
            inputs[position] = replace(item, name=f'{item.name}-{seen[item.name]}')
    return inputs


def parse_target(target, class_names):
    """Check what :func:`explain_inputs` is to explain.

    Parameters
    ----------
    target: str or int
        ``'label'``, ``'pred'``, ``'all'``, a class index, or a class name (any case), e.g. ``'glioma'`` or ``'1'``.
    class_names: sequence of str
        The model's classes.

    Returns
    -------
    str or int
        One of :data:`FILE_TARGETS`, or a class index in ``0 .. K-1``.
    """
    if isinstance(target, str):
        text = target.strip().lower()
        lowered = [name.lower() for name in class_names]
        if text in FILE_TARGETS:
            return text
        if text in lowered:
            return lowered.index(text)
        if not text.lstrip('-').isdigit():
            raise ExplainError(f'target must be {", ".join(FILE_TARGETS)}, a class index or a class name '
                               f'({", ".join(class_names)}); got {target!r}')
        target = int(text)
    if isinstance(target, bool) or not isinstance(target, Integral) or not 0 <= target < len(class_names):
        raise ExplainError(f'target class {target!r} is not one of the model\'s classes 0 .. {len(class_names) - 1} '
                           f'({", ".join(class_names)})')
    return int(target)


@dataclass
class FileExplanation:
    """The explanation of one :class:`InputImage` by :func:`explain_inputs`.

    Attributes
    ----------
    input: InputImage
    class_names: list of str
    target: int
        The class the main map explains.
    target_reason: str
        Why: ``'label'`` (the true class), ``'prediction'`` (asked for, or no label known) or ``'given'``.
    relevance: torch.Tensor
        ``(C, S, S)``, the main map (``<name>.npy``).
    probabilities: torch.Tensor
        ``(K,)``.
    prediction: int
    quantile: float
        The relevance mask keeps the pixels above it.
    scores: dict or None
        The main map's metrics (:data:`METRICS` as floats, :data:`FLAGS` as bools); ``None`` without a mask.
    class_relevance: torch.Tensor or None
        ``(K, C, S, S)``, row ``k`` explaining class ``k`` (``<name>.classes.npy``); only for target ``'all'``.
    class_iou: torch.Tensor or None
        ``(K,)``, the IoU of each class's map; for target ``'all'`` with a mask.
    paths: list of str
        The files written.
    """
    input: InputImage
    class_names: list
    target: int
    target_reason: str
    relevance: torch.Tensor
    probabilities: torch.Tensor
    prediction: int
    quantile: float
    scores: object = None
    class_relevance: object = None
    class_iou: object = None
    paths: list = field(default_factory=list)

    def format(self):
        """A few lines for the terminal: prediction with probabilities, the metrics, the files written."""
        names, item = self.class_names, self.input
        label = 'no label' if item.label is None else f'label {names[item.label]}'
        patient = '' if item.patient is None else f', patient {item.patient}'
        why = {'label': 'the label', 'prediction': 'the prediction', 'given': 'as asked'}[self.target_reason]
        lines = [
            f'{item.name}: {item.path}{patient}',
            f'  {label}, predicted {names[self.prediction]}; probabilities '
            + ', '.join(f'{name} {float(p):.3f}' for name, p in zip(names, self.probabilities)),
        ]
        explained = f'relevance of {names[self.target]} ({why})'
        if self.scores is None:
            lines.append(f'  {explained}; no tumour mask, so no metrics')
        else:
            lines.append(f'  {explained}, mask above its {self.quantile:g} quantile: '
                         + ', '.join(f'{name} {_number(self.scores[name])}' for name in METRICS))
        if self.class_iou is not None:
            lines.append('  IoU of each class\'s map: '
                         + ', '.join(f'{name} {_number(value)}' for name, value in zip(names, self.class_iou)))
        if self.paths:
            lines.append('  wrote ' + ', '.join(self.paths))
        return '\n'.join(lines)


def _number(value):
    value = float(value)
    return 'n/a' if math.isnan(value) else f'{value:.3f}'


def _save_array(path, tensor):
    buffer = io.BytesIO()
    np.save(buffer, tensor.numpy())
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _write_files(result, out, title):
    """Write ``<name>.png`` (four panels), ``<name>.npy`` and, with per-class maps, ``<name>.classes.png`` and
    ``<name>.classes.npy``; return their paths."""
    from lrp_brain.figures import four_panel, per_class_figure

    item, base = result.input, os.path.join(out, result.input.name)
    mask = item.mask if item.mask is not None else torch.zeros(item.image.shape[-2:])
    if item.mask is None:
        title += '\nan image file has no tumour mask: panel (b) shows none, and there is no IoU'
    binary = metrics.relevance_mask(result.relevance[None], result.quantile)[0]
    iou = math.nan if result.scores is None else result.scores['iou']
    paths = [os.fspath(four_panel(base + '.png', item.image, mask, result.relevance, binary, iou, title=title)),
             _save_array(base + '.npy', result.relevance)]
    if result.class_relevance is not None:
        paths.append(os.fspath(per_class_figure(
            base + '.classes.png', item.image, result.class_relevance, result.class_names, result.probabilities,
            mask=item.mask, title=f'{os.path.basename(item.path)}: relevance of every class',
        )))
        paths.append(_save_array(base + '.classes.npy', result.class_relevance))
    return paths


def explain_inputs(source, inputs, target='label', *, method='lrp', epsilon=0.25, gamma=0.1, quantile=0.9,
                   device='cpu', out=None, composite_kwargs=None, progress=False):
    """Explain single images, score each map against its tumour mask where there is one, and draw them.

    Parameters
    ----------
    source: Source
        The model (see :func:`open_model`); its transform must be the one ``inputs`` were read with.
    inputs: list of InputImage
        See :func:`gather_inputs`.
    target: str or int
        ``'label'`` (the true class; the predicted one for an image without label), ``'pred'``, a class index or
        name, or ``'all'``: every class's map besides the main one (the label's, else the prediction's).
    method, epsilon, gamma, composite_kwargs:
        See :func:`lrp_brain.explain.explain`.
    quantile: float
        The relevance mask keeps the pixels above this quantile (0.9: the top 10 %).
    device: str or torch.device
    out: str, optional
        Folder for, per input, ``<name>.png`` (four panels: image, mask, relevance, relevance mask with IoU) and
        ``<name>.npy`` (the main map, ``(C, S, S)`` float32), and for ``'all'`` ``<name>.classes.png`` (one map per
        class) and ``<name>.classes.npy`` (``(K, C, S, S)``, row ``k`` explaining class ``k``). Nothing is written if
        ``None``.
    progress: bool
        Show a progress bar over the inputs.

    Returns
    -------
    list of FileExplanation
    """
    target = parse_target(target, source.class_names)
    low, high = source.bounds
    options = {'method': method, 'epsilon': epsilon, 'gamma': gamma, 'low': low, 'high': high, 'device': device,
               'composite_kwargs': composite_kwargs}
    described = f'LRP, ε = {epsilon:g}, γ = {gamma:g}' if method == 'lrp' else method
    results = []
    for item in tqdm(inputs, desc='explain', unit='image', disable=not progress):
        if item.label is not None and item.label >= len(source.class_names):
            raise ExplainError(f'{item.path}: label {item.label} is not one of the model\'s classes 0 .. '
                               f'{len(source.class_names) - 1}')
        if target == 'all':
            every = explain_all_classes(source.model, item.image, **options)
            prediction = int(every.predictions[0])
            main, reason = (item.label, 'label') if item.label is not None else (prediction, 'prediction')
            relevance, class_relevance, probabilities = every.relevance[main], every.relevance, every.probabilities[0]
        else:
            if isinstance(target, int):
                wanted, reason = target, 'given'
            elif target == 'label' and item.label is not None:
                wanted, reason = item.label, 'label'
            else:
                wanted, reason = 'pred', 'prediction'
            explanation = explain(source.model, item.image[None], target=wanted, **options)
            prediction, main = int(explanation.predictions[0]), int(explanation.targets[0])
            relevance, class_relevance, probabilities = explanation.relevance[0], None, explanation.probabilities[0]
        result = FileExplanation(item, source.class_names, main, reason, relevance, probabilities, prediction,
                                 quantile, class_relevance=class_relevance)
        if item.mask is not None:
            scores = metrics.evaluate_maps(relevance[None], item.mask[None], quantile, names=[item.path])
            result.scores = {name: float(scores[name][0]) for name in METRICS}
            result.scores.update({name: bool(scores[name][0]) for name in FLAGS})
            if class_relevance is not None:
                result.class_iou = metrics.iou(class_relevance, item.mask.expand(len(class_relevance), -1, -1),
                                               quantile)
        if out is not None:
            names = source.class_names
            label = 'no label' if item.label is None else names[item.label]
            title = (f'{os.path.basename(item.path)}: {label}, predicted {names[prediction]} '
                     f'(p = {float(probabilities[prediction]):.2f}); relevance of {names[main]}, {described}')
            result.paths = _write_files(result, out, title)
        results.append(result)
    return results
