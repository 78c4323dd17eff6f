"""VGG classifiers: builders, checkpoints with metadata, and safe loading.

Two families of networks are built, both with torchvision's module names (``features.N``, ``avgpool``,
``classifier.N``), so their state dicts and rule tables read the same:

* ``width=None``: torchvision's own ``vgg11``/``vgg13``/``vgg16``/``vgg19`` (``_bn``) with an ``n``-class head, built
  with ``weights=None`` (nothing is ever downloaded; ImageNet weights come from a local file, :func:`init_imagenet`).
* ``width=w``: the same topology with every width scaled by ``w / 64``: convolution channels
  ``64, 128, 256, 512, 512 → w, 2w, 4w, 8w, 8w`` and fully connected layers ``4096 → 64w``, for CPU demos and tests.
  ``width=64`` is the full network.

A checkpoint is a dict saved with :func:`torch.save` that holds only tensors, strings, numbers, lists, dicts and
``None``, so that it loads with ``torch.load(weights_only=True)`` — no code is ever unpickled::

    {'format': 'lrp-brain-checkpoint', 'version': 1, 'state_dict': {...},
     'meta': {'arch': 'vgg16', 'width': None, 'batch_norm': False, 'num_classes': 3, 'class_names': [...],
              'input_size': 224, 'transform': {'size': 224, 'value_range': [0.0, 1.0], ...},
              'split_file': None, 'val_accuracy': None, ...}}

The transform in the metadata is what the network was trained on; :func:`lrp_brain.composites.zbox_bounds` derives the
z^B bounds from it. Bare torchvision state dicts (the study's ``VGG16_X.pth``) load too: the architecture is read off
the weights' names and shapes and the rest of the metadata gets the project's defaults, marked ``'inferred': True``.
"""
import io
import numbers
import os
import pickle
import re
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs as VGG_CONFIGS
from torchvision.models.vgg import make_layers

from lrp_brain.data import CLASS_NAMES, Transform
from lrp_brain.outputs import atomic_write_bytes

CHECKPOINT_FORMAT = 'lrp-brain-checkpoint'
CHECKPOINT_VERSION = 1

#: The VGG depths and their torchvision configuration letters.
ARCHITECTURES = {'vgg11': 'A', 'vgg13': 'B', 'vgg16': 'D', 'vgg19': 'E'}

#: The width (channels of the first convolution) of the full networks; reduced widths scale everything by w / 64.
FULL_WIDTH = 64

#: The demo model shipped as package data, so that ``lrp-brain explain`` works without any download.
DEMO_MODEL_PATH = Path(__file__).parent / 'assets' / 'demo_model.pt'

#: Metadata fields that follow from the weights themselves.
STRUCTURE_FIELDS = ('arch', 'width', 'batch_norm', 'num_classes')


class CheckpointError(ValueError):
    """A model that cannot be built, or a checkpoint that cannot be saved or loaded; the message names the file, the
    field or the layer at fault."""


def parse_arch(arch, batch_norm=False):
    """Split an architecture name into the VGG depth and whether it has BatchNorm.

    Parameters
    ----------
    arch: str
        ``'vgg11'``, ``'vgg13'``, ``'vgg16'`` or ``'vgg19'``, optionally with the suffix ``'_bn'``.
    batch_norm: bool
        BatchNorm after every convolution even without the suffix.

    Returns
    -------
    name: str
        The depth without suffix, e.g. ``'vgg16'``.
    batch_norm: bool
    """
    name = str(arch)
    if name.endswith('_bn'):
        name, batch_norm = name[:-len('_bn')], True
    if name not in ARCHITECTURES:
        known = ', '.join(f'{known}[_bn]' for known in ARCHITECTURES)
        raise CheckpointError(f'unknown architecture {arch!r}; known: {known}')
    return name, bool(batch_norm)


class NarrowVGG(nn.Module):
    """torchvision's VGG with its fully connected layers sized by a parameter.

    The forward pass and the module names are torchvision's: ``features``, ``avgpool``
    (``AdaptiveAvgPool2d((7, 7))``), flattening, and ``classifier`` =
    ``Linear(c·7·7, hidden), ReLU, Dropout, Linear(hidden, hidden), ReLU, Dropout, Linear(hidden, num_classes)`` at
    indices 0-6. The weights are initialised as torchvision initialises its VGG.

    Parameters
    ----------
    features: torch.nn.Sequential
        The convolutional part (:func:`torchvision.models.vgg.make_layers`).
    feature_channels: int
        The channels ``c`` of the last convolution.
    hidden: int
        The width of the two hidden fully connected layers.
    num_classes: int
    dropout: float
    """
    def __init__(self, features, feature_channels, hidden, num_classes, dropout=0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(feature_channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0., .01)
                nn.init.zeros_(module.bias)

    def forward(self, input):
        output = self.avgpool(self.features(input))
        return self.classifier(torch.flatten(output, 1))


def build_model(arch='vgg16', num_classes=3, width=None, batch_norm=False):
    """Build a VGG classifier with random weights (never downloads anything).

    Parameters
    ----------
    arch: str
        ``'vgg11'``, ``'vgg13'``, ``'vgg16'`` or ``'vgg19'``; the suffix ``'_bn'`` adds BatchNorm.
    num_classes: int
        Outputs of the last layer.
    width: int, optional
        ``None`` builds torchvision's full network; an int ``w`` the width-reduced topology (channels
        ``w, 2w, 4w, 8w, 8w``, fully connected layers ``64w``); ``64`` is full size.
    batch_norm: bool
        BatchNorm after every convolution (as ``'_bn'``).

    Returns
    -------
    torch.nn.Module
        In training mode, as torchvision returns it.
    """
    name, batch_norm = parse_arch(arch, batch_norm)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise CheckpointError(f'num_classes must be a positive integer, got {num_classes!r}')
    if width is None:
        return torchvision.models.get_model(
            name + ('_bn' if batch_norm else ''), weights=None, num_classes=int(num_classes)
        )
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
        raise CheckpointError(f'width must be a positive integer or None, got {width!r}')
    # every channel count of torchvision's configuration is a multiple of 64, so c·w/64 is an integer
    config = [entry if entry == 'M' else entry * int(width) // FULL_WIDTH for entry in VGG_CONFIGS[ARCHITECTURES[name]]]
    return NarrowVGG(
        make_layers(config, batch_norm=batch_norm),
        feature_channels=config[-2],
        hidden=4096 * int(width) // FULL_WIDTH,
        num_classes=int(num_classes),
    )


def vgg16_small(width=8, num_classes=3, batch_norm=False):
    """The width-reduced VGG16 topology (13 convolutions in 5 blocks, 3 linear layers) for demos and tests."""
    return build_model('vgg16', num_classes=num_classes, width=width, batch_norm=batch_norm)


def infer_structure(state_dict, source='state dict'):
    """Read the architecture of a torchvision-style VGG off its state dict.

    Parameters
    ----------
    state_dict: dict
        ``{'features.0.weight': tensor, ...}``.
    source: str
        Names the weights in error messages (a file name).

    Returns
    -------
    dict
        ``arch`` (depth, from the number of convolutions), ``batch_norm`` (running statistics present in
        ``features``), ``num_classes`` (outputs of the last linear layer of ``classifier``) and ``width`` (``None`` for
        torchvision's full network, else the first convolution's channels).
    """
    def indexed(prefix, dims):
        return sorted(
            (int(key.split('.')[1]), value) for key, value in state_dict.items()
            if key.startswith(prefix) and key.endswith('.weight') and key.count('.') == 2
            and key.split('.')[1].isdigit() and isinstance(value, torch.Tensor) and value.ndim == dims
        )

    convolutions, linears = indexed('features.', 4), indexed('classifier.', 2)
    if not convolutions or not linears:
        keys = ', '.join(list(state_dict)[:4])
        raise CheckpointError(
            f'{source}: not a VGG state dict: expected convolution weights features.N.weight and linear weights '
            f'classifier.N.weight, found keys {keys}{", ..." if len(state_dict) > 4 else ""}'
        )
    depths = {len([entry for entry in VGG_CONFIGS[letter] if entry != 'M']): name
              for name, letter in ARCHITECTURES.items()}
    if len(convolutions) not in depths:
        raise CheckpointError(
            f'{source}: {len(convolutions)} convolutions in features; VGG has '
            f'{", ".join(f"{count} ({name})" for count, name in sorted(depths.items()))}'
        )
    width = convolutions[0][1].shape[0]
    hidden = linears[0][1].shape[0]
    return {
        'arch': depths[len(convolutions)],
        'width': None if (width, hidden) == (FULL_WIDTH, 4096) else int(width),
        'batch_norm': any(key.startswith('features.') and key.endswith('.running_mean') for key in state_dict),
        'num_classes': int(linears[-1][1].shape[0]),
    }


def default_meta(arch='vgg16', width=None, batch_norm=False, num_classes=3):
    """Metadata with the project's defaults: min-max input in [0, 1] at 224 px, the tumour class names for 3 classes.

    Returns
    -------
    dict
        All the fields of a checkpoint's ``meta``; ``split_file`` and ``val_accuracy`` are ``None`` (unknown).
    """
    class_names = list(CLASS_NAMES) if num_classes == len(CLASS_NAMES) else [f'class_{index}' for index in
                                                                              range(num_classes)]
    return {
        'arch': arch,
        'width': width,
        'batch_norm': batch_norm,
        'num_classes': num_classes,
        'class_names': class_names,
        'input_size': 224,
        'transform': Transform(size=224, value_range=(0., 1.)).to_dict(),
        'split_file': None,
        'val_accuracy': None,
    }


def _plain(value, field):
    """Return ``value`` as the types ``torch.load(weights_only=True)`` reads back without code (tuples become lists,
    paths strings, numpy scalars Python numbers), or raise naming ``field``."""
    if value is None or isinstance(value, (bool, torch.Tensor)):
        return value
    if isinstance(value, str):
        return str(value)  # a str subclass (e.g. torch.__version__) would need code to unpickle
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item, f'{field}[{index}]') for index, item in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise CheckpointError(f'meta field {field}: keys must be strings, got {key!r}')
        return {key: _plain(item, f'{field}.{key}') for key, item in value.items()}
    raise CheckpointError(
        f'meta field {field}: {type(value).__name__} cannot be stored (only tensors, str, int, float, bool, None, '
        f'lists and dicts load with weights_only=True)'
    )


def _fit_problems(expected, given, skip=()):
    """Say how the tensors ``given`` do not fit the state dict ``expected`` (``''`` if they fit): shape mismatches,
    then missing and unexpected keys, the first six of them. Keys starting with a prefix in ``skip`` and missing
    BatchNorm batch counters are ignored."""
    def wanted(key):
        return not key.startswith(tuple(skip))

    problems = []
    for key, value in given.items():
        if wanted(key) and key in expected:
            if not isinstance(value, torch.Tensor):
                problems.append(f'{key}: checkpoint holds a {type(value).__name__}, not a tensor')
            elif value.shape != expected[key].shape:
                problems.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}')
    problems += [f'missing {key}' for key in expected
                 if wanted(key) and key not in given and not key.endswith('num_batches_tracked')]
    problems += [f'unexpected {key}' for key in given if wanted(key) and key not in expected]
    return _first_problems(problems)


def _non_finite_problems(tensors):
    """Say which floating-point tensors of ``tensors`` hold NaN or inf (``''`` if none), the first six of them."""
    return _first_problems([
        f'{key} holds {int((~torch.isfinite(value)).sum())} NaN or infinite values' for key, value in tensors.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
    ])


def _first_problems(problems, count=6):
    """The first ``count`` of ``problems`` joined by ``'; '``, then how many more there are."""
    return '; '.join(problems[:count]) + (f'; and {len(problems) - count} more' if len(problems) > count else '')


def _structure_in_words(state_dict):
    """The architecture :func:`infer_structure` reads off ``state_dict``, in words; ``'no VGG'`` if none."""
    try:
        return _describe(infer_structure(state_dict))
    except CheckpointError:
        return 'no VGG'


def _describe(structure):
    width = 'full width' if structure['width'] is None else f'width {structure["width"]}'
    return (f'{structure["arch"]}{"_bn" if structure["batch_norm"] else ""} ({width}, '
            f'{structure["num_classes"]} classes)')


def save_checkpoint(path, model, meta):
    """Save ``model`` with its metadata as an lrp-brain checkpoint, atomically (temporary file, then rename).

    Parameters
    ----------
    path: str or os.PathLike
    model: torch.nn.Module
        A network of :func:`build_model`.
    meta: dict
        Metadata (see the module docstring). ``arch``, ``width``, ``batch_norm`` and ``num_classes`` are read off the
        model (given ones must agree); missing fields get :func:`default_meta`'s values.

    Raises
    ------
    CheckpointError
        If a metadata field cannot be stored safely, disagrees with the model, or the model is not one
        :func:`build_model` rebuilds.
    """
    path = os.fspath(path)
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    structure = infer_structure(state_dict, source=f'model for {path}')
    meta = _plain(dict(meta), 'meta')
    given = {field: meta[field] for field in STRUCTURE_FIELDS if field in meta}
    if 'arch' in given:
        given['arch'], suffix_batch_norm = parse_arch(given['arch'])
        given['batch_norm'] = given.get('batch_norm', False) or suffix_batch_norm
    if given.get('width') == FULL_WIDTH:
        given['width'] = None
    for field, value in given.items():
        if value != structure[field]:
            raise CheckpointError(f'{path}: meta field {field} is {meta[field]!r} but the model is '
                                  f'{_describe(structure)}')
    meta = {**default_meta(**structure), **meta, **structure}
    with torch.device('meta'):
        rebuilt = build_model(meta['arch'], meta['num_classes'], meta['width'], meta['batch_norm'])
    problems = _fit_problems(rebuilt.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f'{path}: the model is not a {_describe(structure)} that load_checkpoint can rebuild: {problems}'
        )
    payload = {'format': CHECKPOINT_FORMAT, 'version': CHECKPOINT_VERSION, 'state_dict': state_dict, 'meta': meta}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _read(path, map_location='cpu'):
    """``torch.load(path, weights_only=True)``, with every failure turned into a :class:`CheckpointError` naming the
    file; a file that needs pickled code is refused, never loaded with ``weights_only=False``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such checkpoint file')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        needed = _globals_needed(path, str(error))
        if not needed:
            raise CheckpointError(f'{path}: not a readable torch checkpoint (corrupt or truncated?): '
                                  f'{_first_line(error)}') from None
        raise CheckpointError(
            f'{path}: refused: loading it needs pickled code ({", ".join(needed)}), and checkpoints are only loaded '
            f'with torch.load(weights_only=True) because unpickling code can run anything. Save the weights instead, '
            f'e.g. torch.save(model.state_dict(), path), or use lrp_brain.model.save_checkpoint'
        ) from None
    except Exception as error:  # torch.load reports damaged files with many exception types
        raise CheckpointError(f'{path}: not a readable torch checkpoint (corrupt or truncated?): '
                              f'{_first_line(error)}') from None


def _first_line(error):
    """The cause of a load failure in one line: for the weights-only unpickler its own reason, not torch's advice
    around it (which suggests retrying with ``weights_only=False``, exactly what must not be done with a file of
    unknown origin)."""
    text = str(error)
    reason = re.search(r'WeightsUnpickler error:\s*(\S.*)', text)
    if reason:
        return reason.group(1)
    return text.splitlines()[0] if text else type(error).__name__


def _globals_needed(path, message):
    """The classes and functions a file refused by the weights-only unpickler would import (empty if it was refused
    for being damaged): listed by torch for zip checkpoints, else taken from the error message."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a readable zip checkpoint: the legacy format, or damaged
        return re.findall(r'Unsupported global: GLOBAL (\S+)', message)


def _is_state_dict(payload):
    return isinstance(payload, dict) and bool(payload) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload.items()
    )


def load_checkpoint(path, map_location='cpu'):
    """Load a model and its metadata from an lrp-brain checkpoint or a bare torchvision VGG state dict.

    Parameters
    ----------
    path: str or os.PathLike
    map_location: str or torch.device
        Where the tensors are loaded (as in :func:`torch.load`).

    Returns
    -------
    model: torch.nn.Module
        In evaluation mode.
    meta: dict
        The checkpoint's metadata; for a bare state dict :func:`default_meta` with the inferred architecture,
        ``'inferred': True`` and ``'source'``, the file.

    Raises
    ------
    CheckpointError
        Naming the file and, where it applies, the field or layer: code that would need unpickling (refused), a
        corrupt or truncated file, an unknown format or version, missing metadata, missing or unexpected weights,
        shape mismatches (found before the network is allocated), weights holding NaN or inf.
    """
    path = os.fspath(path)
    payload = _read(path, map_location)
    if isinstance(payload, dict) and payload.get('format') == CHECKPOINT_FORMAT:
        version = payload.get('version')
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(
                f'{path}: checkpoint version {version!r}; this lrp-brain reads version {CHECKPOINT_VERSION}'
            )
        meta, state_dict = payload.get('meta'), payload.get('state_dict')
        if not isinstance(meta, dict) or not isinstance(state_dict, dict):
            raise CheckpointError(f'{path}: checkpoint lacks its meta or state_dict dict')
        absent = [field for field in STRUCTURE_FIELDS if field not in meta]
        if absent:
            raise CheckpointError(f'{path}: meta lacks the field(s) {", ".join(absent)}')
    elif _is_state_dict(payload):
        state_dict = payload
        meta = {**default_meta(**infer_structure(state_dict, source=path)), 'inferred': True, 'source': path}
    else:
        keys = ', '.join(map(repr, list(payload)[:4])) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f'{path}: neither an lrp-brain checkpoint nor a state dict of tensors (found {keys})'
        )
    try:
        with torch.device('meta'):  # the shapes only: metadata naming a huge network allocates nothing
            skeleton = build_model(meta['arch'], meta['num_classes'], meta['width'], meta['batch_norm'])
    except CheckpointError as error:
        raise CheckpointError(f'{path}: {error}') from None
    problems = _fit_problems(skeleton.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f'{path}: the weights, {_structure_in_words(state_dict)}, do not fit {_describe(meta)}: {problems}'
        )
    non_finite = _non_finite_problems(state_dict)
    if non_finite:
        raise CheckpointError(f'{path}: the weights are broken: {non_finite}')
    model = build_model(meta['arch'], meta['num_classes'], meta['width'], meta['batch_norm'])
    model.load_state_dict(state_dict, strict=False)
    return model.to(map_location).eval(), meta


def init_imagenet(model, path):
    """Initialise ``model`` from a local torchvision ImageNet state dict (e.g. ``vgg16-397923af.pth``).

    The features and the fully connected layers except the last one (the class head, left as it is) are loaded.
    Nothing is downloaded: fetch the file yourself and give its path.

    Parameters
    ----------
    model: torch.nn.Module
        A network of :func:`build_model` of the same architecture and width as the file.
    path: str or os.PathLike

    Returns
    -------
    list of str
        The names of the tensors loaded.

    Raises
    ------
    CheckpointError
        Naming the file and every layer that is missing, unexpected, shaped differently or holds NaN or inf.
    """
    path = os.fspath(path)
    weights = _read(path)
    if not _is_state_dict(weights):
        raise CheckpointError(f'{path}: not a torchvision state dict of tensors')
    linears = [name for name, module in model.classifier.named_modules(prefix='classifier')
               if isinstance(module, nn.Linear)]
    head = linears[-1] + '.'
    problems = _fit_problems(model.state_dict(), weights, skip=(head,))
    if problems:
        raise CheckpointError(
            f'{path}: the ImageNet weights, {_structure_in_words(weights)}, do not fit the model, '
            f'{_structure_in_words(model.state_dict())} (its last layer aside): {problems}'
        )
    loaded = {key: value for key, value in weights.items() if not key.startswith(head)}
    non_finite = _non_finite_problems(loaded)
    if non_finite:
        raise CheckpointError(f'{path}: the ImageNet weights are broken: {non_finite}')
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def load_demo_model():
    """Load the small demo classifier shipped with the package (``lrp_brain/assets/demo_model.pt``).

    Returns
    -------
    model, meta
        As :func:`load_checkpoint`.
    """
    if not DEMO_MODEL_PATH.is_file():
        raise CheckpointError(
            f'{DEMO_MODEL_PATH}: the demo model has not been created yet; train one with `lrp-brain train` and save '
            f'its checkpoint to this path'
        )
    return load_checkpoint(DEMO_MODEL_PATH)


def resolve_device(device='auto'):
    """Turn ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` into a :class:`torch.device` that exists here.

    ``'auto'`` is the GPU when CUDA is available, else the CPU.
    """
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f'device must be auto, cpu, cuda or cuda:N, got {device!r}') from None
    if resolved.type not in ('cpu', 'cuda'):
        raise ValueError(f'device must be auto, cpu, cuda or cuda:N, got {device!r}')
    if resolved.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f'device {device!r} requested but CUDA is not available here')
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f'device {device!r} requested but only {count} CUDA device(s) exist')
    return resolved
