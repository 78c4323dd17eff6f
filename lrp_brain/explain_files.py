"""Explaining single files, the loop behind ``lrp-brain explain``: Figshare ``.mat`` slices, PNG or JPEG images,
slices of a dataset by position, or, given none, one phantom slice per class; each explained, scored against its
tumour mask where it has one, and drawn.
"""
import io
import math
import os
from dataclasses import dataclass, field, replace
from numbers import Integral

import numpy as np
import torch
from tqdm import tqdm

from lrp_brain import faithfulness, metrics
from lrp_brain.data import (CLASS_NAMES, IMAGE_SUFFIXES, ZIP_SEPARATOR, DataError, check_class_names, find_files,
                            find_slices, open_dataset, read_image, read_slice)
from lrp_brain.explain import ExplainError, check_options, explain, explain_all_classes
from lrp_brain.metrics import FLAGS, METRICS
from lrp_brain.outputs import atomic_write_bytes, writable_folder
from lrp_brain.phantom import phantom_dataset
from lrp_brain.sanity import compare_classes
from lrp_brain.sources import DEFAULT_PHANTOMS

#: The phantoms ``lrp-brain explain`` shows when given no input: the first slice of each class of a small set with
#: the held-out seed of :data:`DEFAULT_PHANTOMS`. Writing the default set and scanning it for its split takes about a
#: minute on two CPU cores, longer than the command may take; these slices are written in a few seconds.
EXPLAIN_PHANTOMS = {'n': 24, 'seed': DEFAULT_PHANTOMS['seed']}

#: What the target of :func:`explain_inputs` may be besides a class index or name.
FILE_TARGETS = ('label', 'pred', 'all')


@dataclass
class InputImage:
    """One image to explain, preprocessed as the model expects.

    Attributes
    ----------
    name: str
        Names its output files (``<name>.png``, ``<name>.npy``, ...; see :func:`output_names`).
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


#: Characters of a path that cannot be part of a file name, written ``%XX`` in output names (``%`` itself too, so the
#: escaping is undone unambiguously and two paths never give one name).
_ESCAPED = {'%', '/', ':', '\\'} | {os.sep} | ({os.altsep} if os.altsep else set())

#: The longest file name (in bytes) most file systems accept.
NAME_MAX = 255

#: What each input's files add to its name (``<name>.png``, ...); an input's name ends with its own suffix
#: (``.mat``, ``.png``, ...), never with ``.classes``, so one input's files cannot be another's.
OUTPUT_SUFFIXES = ('.png', '.npy', '.classes.png', '.classes.npy')


def _escape(text):
    return ''.join(f'%{ord(character):02X}' if character in _ESCAPED else character for character in text)


def output_names(refs):
    """Name the outputs of files to explain: each file's path relative to the folder all of them share, separators
    escaped (``col/a/good.png`` and ``col/b/good.png`` → ``a%2Fgood.png`` and ``b%2Fgood.png``; a single file keeps
    its own name, ``good.png``). Distinct files get distinct names, each ending with its file's suffix.

    Parameters
    ----------
    refs: list of str
        Files or zip members (``archive.zip::member.mat``), each at most once.

    Returns
    -------
    list of str
    """
    outer = [os.path.abspath(os.fspath(ref).split(ZIP_SEPARATOR)[0]) for ref in refs]
    if not outer:
        return []
    parent = os.path.commonpath([os.path.dirname(path) for path in outer])
    names = []
    for ref, path in zip(refs, outer):
        _, separator, member = os.fspath(ref).partition(ZIP_SEPARATOR)
        name = _escape(os.path.relpath(path, parent).replace(os.sep, '/') + separator + member)
        if len(os.fsencode(name + OUTPUT_SUFFIXES[-1])) > NAME_MAX:
            raise ExplainError(f'{ref}: its output name {name!r} would be longer than the {NAME_MAX} bytes a file '
                               f'name may have; move or rename the input')
        names.append(name)
    return names


def _slice_input(item, transform, name=None):
    image, mask = transform(item.image, item.mask, full_scale=item.full_scale)
    return InputImage(name or output_names([item.path])[0], item.path, image, mask, item.label, item.patient)


def _refuse_repeats(refs, sources):
    """Refuse a file given twice (its outputs would be written twice under one name)."""
    seen = {}
    for ref, given_as in zip(refs, sources):
        outer, separator, member = os.fspath(ref).partition(ZIP_SEPARATOR)
        key = os.path.realpath(outer) + separator + member
        if key in seen:
            raise ExplainError(f'{ref} is given twice ({seen[key]} and {given_as}); give each input once')
        seen[key] = given_as


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
        :func:`lrp_brain.data.read_image_file`).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path.split(ZIP_SEPARATOR)[-1])[1].lower()
    if suffix == '.mat':
        return _slice_input(read_slice(path), transform)
    if suffix in IMAGE_SUFFIXES:
        pixels, full_scale = read_image(path)
        image, _ = transform(pixels, full_scale=full_scale)
        return InputImage(output_names([path])[0], path, image, None, None, None)
    raise DataError(f'cannot explain a file of type {suffix or "(no suffix)"!r}: give a Figshare .mat slice or a '
                    f'{"/".join(IMAGE_SUFFIXES)} image', path, 'unknown format')


def dataset_refs(data, indices):
    """The references of the slices of a dataset (of either format, see :func:`lrp_brain.data.open_dataset`) at
    positions ``indices`` of its file order (:func:`lrp_brain.data.find_files`; ``0`` is ``1.mat`` of a complete
    Figshare folder)."""
    refs = find_files(data)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, Integral) or not 0 <= index < len(refs):
            raise DataError(f'slice index {index!r} is outside the {len(refs)} slices (0 .. {len(refs) - 1})',
                            ', '.join(open_dataset(data).sources), 'index')
    return [refs[index] for index in indices]


def demo_inputs(transform, quiet=False):
    """One phantom slice per class, the first of each in file order, of the :data:`EXPLAIN_PHANTOMS` set (written
    to the cache folder on first use); each is named ``<class>-<file name>``, e.g. ``glioma-3.mat``."""
    chosen = {}
    for ref in find_slices(phantom_dataset(**EXPLAIN_PHANTOMS, quiet=quiet)):
        item = read_slice(ref)
        chosen.setdefault(item.label, item)
        if len(chosen) == len(CLASS_NAMES):
            break
    return [_slice_input(item, transform, f'{item.class_name}-{output_names([item.path])[0]}')
            for _, item in sorted(chosen.items())]


def gather_inputs(transform, paths=(), data=None, indices=(), quiet=False, class_names=None):
    """The images ``lrp-brain explain`` works on: the files ``paths``, the slices ``indices`` of ``data`` (a Figshare
    dataset or an image folder), or, given neither, :func:`demo_inputs`. Each is named by :func:`output_names`, so no
    output overwrites another and every file says which input it belongs to; a file given twice is refused. With
    ``class_names`` (the model's), a dataset of other classes is refused (:func:`lrp_brain.data.check_class_names`).

    Returns
    -------
    list of InputImage
    """
    if not paths and data is None:
        return demo_inputs(transform, quiet)
    refs = [os.fspath(path) for path in paths]
    given_as = [f'input {position + 1}' for position in range(len(refs))]
    dataset = None if data is None else open_dataset(data)
    if dataset is not None:
        if class_names is not None:
            check_class_names(dataset, class_names)
        refs += dataset_refs(dataset, indices)
        given_as += [f'--index {index}' for index in indices]
    _refuse_repeats(refs, given_as)
    names = output_names(refs)
    inputs = [read_input(path, transform) for path in paths]
    inputs += [_slice_input(dataset.read(ref), transform) for ref in refs[len(inputs):]]
    return [replace(item, name=name) for item, name in zip(inputs, names)]


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
    faithfulness: dict or None
        The main map's :data:`~lrp_brain.faithfulness.COLUMNS`.
    class_sensitivity: float or None
        The mean Spearman correlation between the maps of different classes (the class sensitivity of
        :func:`lrp_brain.sanity.class_sensitivity`; 1: the maps do not depend on the class); for target ``'all'``
        and two classes or more.
    contrast: str or None
        The output relevance the maps started from (:mod:`lrp_brain.contrast`).
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
    faithfulness: object = None
    class_sensitivity: object = None
    contrast: object = None
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
        contrasted = f', {self.contrast.upper()}' if self.contrast else ''
        explained = f'relevance of {names[self.target]} ({why}{contrasted})'
        if self.scores is None:
            lines.append(f'  {explained}; no tumour mask, so no metrics')
        else:
            lines.append(f'  {explained}, mask above its {self.quantile:g} quantile: '
                         + ', '.join(f'{name} {_number(self.scores[name])}' for name in METRICS))
        if self.faithfulness is not None:
            gap, morf, lerf = (self.faithfulness[name] for name in ('faithfulness_gap', 'morf_auc', 'lerf_auc'))
            lines.append(f'  faithfulness gap {_number(gap)} (LeRF AUC {_number(lerf)} − MoRF AUC {_number(morf)}: '
                         f'the larger, the more the most relevant patches carry the score)')
        if self.class_iou is not None:
            lines.append('  IoU of each class\'s map: '
                         + ', '.join(f'{name} {_number(value)}' for name, value in zip(names, self.class_iou)))
        if self.class_sensitivity is not None:
            lines.append(f'  class sensitivity (mean Spearman between the classes\' maps; 1: the same map for every '
                         f'class): {_number(self.class_sensitivity)}')
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
            mask=item.mask, title=f'{os.path.basename(item.path)}: relevance of every class'
                                  + (f' ({result.contrast.upper()})' if result.contrast else ''),
        )))
        paths.append(_save_array(base + '.classes.npy', result.class_relevance))
    return paths


def explain_inputs(source, inputs, target='label', *, method='lrp', epsilon=0.25, gamma=0.1, quantile=0.9,
                   device='cpu', out=None, composite_kwargs=None, progress=False, perturbation=None, contrast=None):
    """Explain single images, score each map against its tumour mask where there is one and by region perturbation,
    and draw them.

    Parameters
    ----------
    source: Source
        The model (see :func:`lrp_brain.sources.open_model`); its transform must be the one ``inputs`` were read with.
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
    perturbation: dict, optional
        Region-perturbation settings replacing some of :data:`lrp_brain.faithfulness.DEFAULTS`; the main map's
        :data:`~lrp_brain.faithfulness.COLUMNS` go into :attr:`FileExplanation.faithfulness`.
    contrast: str, optional
        The output relevance of every map (:mod:`lrp_brain.contrast`): ``None`` (one-hot), ``'sglrp'`` or ``'clrp'``.
        For ``'all'`` the per-class figure shows the contrastive maps, and the class sensitivity of the maps is
        measured (with every contrast).

    Returns
    -------
    list of FileExplanation
    """
    target = parse_target(target, source.class_names)
    low, high = source.bounds
    contrast = check_options(method, epsilon, gamma, low, high, composite_kwargs, contrast, len(source.class_names))
    quantile = metrics.check_selection_quantile(quantile)
    perturbation = faithfulness.settings(perturbation)
    if out is not None:
        writable_folder(out)  # before any work: an unwritable folder is found now, not after the computing
    options = {'method': method, 'epsilon': epsilon, 'gamma': gamma, 'low': low, 'high': high, 'device': device,
               'composite_kwargs': composite_kwargs, 'contrast': contrast}
    described = (f'LRP, ε = {epsilon:g}, γ = {gamma:g}' if method == 'lrp' else method) \
        + (f', {contrast.upper()}' if contrast else '')
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
        columns = faithfulness.columns(source.model, item.image[None], relevance[None], [main], perturbation,
                                       [item.path])
        result = FileExplanation(item, source.class_names, main, reason, relevance, probabilities, prediction,
                                 quantile, class_relevance=class_relevance,
                                 faithfulness={name: values[0] for name, values in columns.items()}, contrast=contrast)
        if class_relevance is not None and len(class_relevance) > 1:
            _, mean = compare_classes([row[None] for row in class_relevance])
            result.class_sensitivity = float(mean['spearman'][0])
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
