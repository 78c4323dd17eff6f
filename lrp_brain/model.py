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
              'head': [['Linear', 25088, 4096, True], ['ReLU'], ['Dropout', 0.5], ...], 'avgpool': [7, 7],
              'split_file': None, 'val_accuracy': None, ...}}

``head`` is the classifier's layer sequence (:func:`head_spec`: any sequence of Linear, ReLU, BatchNorm1d and
Dropout) and ``avgpool`` the output size of the average pool before it, so a foreign head (e.g. ``Linear(25088, 64)
→ ReLU → BatchNorm1d(64) → Linear(64, 4)``) saves and loads; checkpoints without them have torchvision's head.
:func:`from_onnx` converts an ONNX VGG (exported by tf2onnx from Keras or by ``torch.onnx.export``) to such a network.

The transform in the metadata is what the network was trained on; :func:`lrp_brain.composites.zbox_bounds` derives the
z^B bounds from it. Bare torchvision state dicts (the study's ``VGG16_X.pth``) load too: the architecture is read off
the weights' names and shapes and the rest of the metadata gets the project's defaults, marked ``'inferred': True``.
"""
import io
import math
import numbers
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs as VGG_CONFIGS
from torchvision.models.vgg import make_layers

from lrp_brain.composites import zbox_bounds
from lrp_brain.data import CLASS_NAMES, MAX_SIDE, DataError, Transform, open_regular_file
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

#: The metadata fields besides the structure that the commands read: every lrp-brain checkpoint has them.
USE_FIELDS = ('class_names', 'input_size', 'transform')


class CheckpointError(ValueError):
    """A model that cannot be built, or a checkpoint that cannot be saved, loaded or imported; the message names the
    file, the field, the layer or the graph node at fault."""


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


class VGGNetwork(nn.Module):
    """torchvision's VGG forward with any parts: ``classifier(flatten(avgpool(features(x)), 1))``.

    Parameters
    ----------
    features: torch.nn.Sequential
        The convolutional part.
    avgpool: torch.nn.Module
        The average pool (``AdaptiveAvgPool2d``).
    classifier: torch.nn.Sequential
        The head.
    """
    def __init__(self, features, avgpool, classifier):
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, input):
        output = self.avgpool(self.features(input))
        return self.classifier(torch.flatten(output, 1))


class NarrowVGG(VGGNetwork):
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
        super().__init__(features, nn.AdaptiveAvgPool2d((7, 7)), nn.Sequential(
            nn.Linear(feature_channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        ))
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


def build_model(arch='vgg16', num_classes=3, width=None, batch_norm=False, head=None, avgpool=(7, 7)):
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
    head: list, optional
        A classifier layer sequence as :func:`head_spec` returns it (its last Linear has ``num_classes`` outputs);
        the network is then a :class:`VGGNetwork` with these features, ``AdaptiveAvgPool2d(avgpool)`` and this head.
        ``None``: torchvision's head.
    avgpool: tuple of int
        The output size of the average pool before ``head`` (torchvision's head always has ``(7, 7)``).

    Returns
    -------
    torch.nn.Module
        In training mode, as torchvision returns it.
    """
    name, batch_norm = parse_arch(arch, batch_norm)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise CheckpointError(f'num_classes must be a positive integer, got {num_classes!r}')
    if width is None and head is None:
        return torchvision.models.get_model(
            name + ('_bn' if batch_norm else ''), weights=None, num_classes=int(num_classes)
        )
    if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1):
        raise CheckpointError(f'width must be a positive integer or None, got {width!r}')
    # every channel count of torchvision's configuration is a multiple of 64, so c·w/64 is an integer
    config = [entry if entry == 'M' or width is None else entry * int(width) // FULL_WIDTH
              for entry in VGG_CONFIGS[ARCHITECTURES[name]]]
    if head is not None:
        return _headed_vgg(make_layers(config, batch_norm=batch_norm), config[-2], int(num_classes), head, avgpool)
    return NarrowVGG(
        make_layers(config, batch_norm=batch_norm),
        feature_channels=config[-2],
        hidden=4096 * int(width) // FULL_WIDTH,
        num_classes=int(num_classes),
    )


def vgg16_small(width=8, num_classes=3, batch_norm=False):
    """The width-reduced VGG16 topology (13 convolutions in 5 blocks, 3 linear layers) for demos and tests."""
    return build_model('vgg16', num_classes=num_classes, width=width, batch_norm=batch_norm)


#: The layers a checkpoint's head can hold, and the arguments its entry records after the layer's name.
HEAD_LAYERS = {
    'Linear': ('in_features', 'out_features', 'bias'),
    'ReLU': (),
    'BatchNorm1d': ('num_features', 'eps', 'affine'),
    'Dropout': ('p',),
}


def _head_argument_problem(name, value):
    """What is wrong with the value of the head argument ``name`` (``''`` if nothing)."""
    if name in ('bias', 'affine'):
        return '' if isinstance(value, bool) else 'a bool'
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return 'a number'
    if name in ('in_features', 'out_features', 'num_features'):
        return '' if isinstance(value, numbers.Integral) and value >= 1 else 'a positive integer'
    if name == 'eps':
        return '' if 0 <= value < float('inf') else 'a finite number >= 0'
    return '' if 0 <= value <= 1 else 'a probability from 0 to 1'


def head_spec(model):
    """The classifier's layer sequence and the average pool's output size of a VGG-like ``model``, as checkpoints
    record them (``meta['head']``, ``meta['avgpool']``).

    Parameters
    ----------
    model: torch.nn.Module
        torchvision's layout: ``avgpool`` an ``AdaptiveAvgPool2d``, ``classifier`` a ``Sequential``.

    Returns
    -------
    head: list of list
        One entry per module of ``model.classifier``: ``['Linear', in_features, out_features, bias]``, ``['ReLU']``,
        ``['BatchNorm1d', num_features, eps, affine]`` or ``['Dropout', p]``.
    avgpool: list of int
        ``[h, w]``, the average pool's output size.

    Raises
    ------
    CheckpointError
        Naming the module that is none of these.
    """
    classifier, avgpool = getattr(model, 'classifier', None), getattr(model, 'avgpool', None)
    size = nn.modules.utils._pair(getattr(avgpool, 'output_size', None))
    if not isinstance(classifier, nn.Sequential) or type(avgpool) is not nn.AdaptiveAvgPool2d or None in size:
        raise CheckpointError(
            f'a checkpoint holds torchvision\'s VGG layout, an `avgpool` AdaptiveAvgPool2d of fixed size and a '
            f'Sequential `classifier`; the model has avgpool {avgpool!r} and classifier {type(classifier).__name__}'
        )
    head = []
    for index, module in enumerate(classifier):
        if type(module) is nn.Linear:
            head.append(['Linear', module.in_features, module.out_features, module.bias is not None])
        elif type(module) is nn.ReLU:
            head.append(['ReLU'])
        elif type(module) is nn.BatchNorm1d and module.track_running_stats:
            head.append(['BatchNorm1d', module.num_features, float(module.eps), module.affine])
        elif type(module) is nn.Dropout:
            head.append(['Dropout', float(module.p)])
        else:
            raise CheckpointError(f'classifier.{index} is {module!r}; a checkpoint\'s head holds Linear, ReLU, '
                                  f'BatchNorm1d (with running statistics) and Dropout layers')
    return head, [int(extent) for extent in size]


def describe_head(head):
    """A head of :func:`head_spec` in one line, e.g. ``Linear(25088→64), ReLU, BatchNorm1d(64), Linear(64→4)``."""
    def words(entry):
        if entry[0] == 'Linear':
            return f'Linear({entry[1]}→{entry[2]})'
        return f'{entry[0]}({entry[1]:g})' if len(entry) > 1 else entry[0]

    return ', '.join(words(entry) for entry in head)


def _headed_vgg(features, channels, num_classes, head, avgpool):
    """A :class:`VGGNetwork` with ``features`` (``channels`` output channels), ``AdaptiveAvgPool2d(avgpool)`` and
    the classifier of ``head`` (see :func:`build_model`); malformed or inconsistent entries raise naming the field."""
    size = list(avgpool) if isinstance(avgpool, (list, tuple)) else [avgpool]
    if len(size) != 2 or any(_head_argument_problem('out_features', extent) for extent in size):
        raise CheckpointError(f'meta field avgpool must be [h, w] of positive integers, got {avgpool!r}')
    if not isinstance(head, (list, tuple)) or not head:
        raise CheckpointError(f'meta field head must be a non-empty list of layers, got {head!r}')
    layers, width, outputs = [], channels * size[0] * size[1], None
    for index, entry in enumerate(head):
        field = f'meta field head[{index}]'
        if not isinstance(entry, (list, tuple)) or not entry or entry[0] not in HEAD_LAYERS \
                or len(entry) != 1 + len(HEAD_LAYERS[entry[0]]):
            known = '; '.join(str([name, *arguments]).replace("'", '') for name, arguments in HEAD_LAYERS.items())
            raise CheckpointError(f'{field} is {entry!r}; a head layer is one of {known}')
        arguments = dict(zip(HEAD_LAYERS[entry[0]], entry[1:]))
        for name, value in arguments.items():
            problem = _head_argument_problem(name, value)
            if problem:
                raise CheckpointError(f'{field}: {entry[0]} {name} must be {problem}, got {value!r}')
        reads = arguments.get('in_features', arguments.get('num_features', width))
        if reads != width:
            raise CheckpointError(f'{field}: {describe_head([entry])} reads {reads} features, but {width} come '
                                  f'before it')
        if entry[0] == 'Linear':
            layers.append(nn.Linear(width, arguments['out_features'], bias=arguments['bias']))
            width = outputs = arguments['out_features']
        elif entry[0] == 'BatchNorm1d':
            layers.append(nn.BatchNorm1d(width, eps=float(arguments['eps']), affine=arguments['affine']))
        elif entry[0] == 'Dropout':
            layers.append(nn.Dropout(float(arguments['p'])))
        else:
            layers.append(nn.ReLU(inplace=True))
    if outputs != num_classes:
        raise CheckpointError(f'meta field num_classes is {num_classes}, but the head ({describe_head(head)}) has '
                              f'{outputs} outputs')
    return VGGNetwork(features, nn.AdaptiveAvgPool2d(tuple(size)), nn.Sequential(*layers))


def _classifier_in_words(state_dict):
    """The classifier layers with weights that ``state_dict`` holds, e.g. ``classifier.0 Linear(25088→64),
    classifier.3 BatchNorm1d(64)``; layers without weights (ReLU, Dropout) leave no trace in it."""
    layers = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if len(parts) == 3 and parts[0] == 'classifier' and parts[1].isdigit() and isinstance(value, torch.Tensor):
            if parts[2] == 'weight' and value.ndim == 2:
                layers[int(parts[1])] = f'Linear({value.shape[1]}→{value.shape[0]})'
            elif parts[2] == 'running_mean':
                layers[int(parts[1])] = f'BatchNorm1d({value.shape[0]})'
            else:
                layers.setdefault(int(parts[1]), f'{parts[2]} {tuple(value.shape)}')
    return ', '.join(f'classifier.{index} {layer}' for index, layer in sorted(layers.items())) or 'none'


def _torchvision_head(state_dict, structure, source):
    """The head and average pool of a bare state dict whose classifier is torchvision's (Linear layers at
    ``classifier.0``, ``.3``, ``.6`` with ReLU and Dropout between, any widths); the average pool's size follows from
    the first Linear's inputs. Any other classifier cannot be read off the weights: the error says what was found
    and what to do."""
    classifier = {key: value for key, value in state_dict.items() if key.startswith('classifier.')}
    linears = [state_dict.get(f'classifier.{index}.weight') for index in (0, 3, 6)]
    expected = {f'classifier.{index}.{name}' for index in (0, 3, 6) for name in ('weight', 'bias')}
    if set(classifier) != expected or any(weight is None or weight.ndim != 2 for weight in linears):
        raise CheckpointError(
            f'{source}: a bare state dict of {_describe(structure)} whose classifier is not torchvision\'s (Linear '
            f'layers at classifier.0, .3 and .6): found {_classifier_in_words(state_dict)}. The layers without '
            f'weights between them (ReLU, Dropout, ...) cannot be read off a state dict: save the model with '
            f'lrp_brain.model.save_checkpoint(path, model, meta) from the code that defines it (the checkpoint then '
            f'records its head), or export it to ONNX and convert that with `lrp-brain import`'
        )
    head = []
    for weight in linears:
        head += [['Linear', weight.shape[1], weight.shape[0], True], ['ReLU'], ['Dropout', .5]]
    channels = [value for key, value in state_dict.items() if key.startswith('features.') and key.endswith(
        '.weight') and value.ndim == 4][-1].shape[0]
    side = math.isqrt(linears[0].shape[1] // channels)
    pool = side if side * side * channels == linears[0].shape[1] else 7
    return head[:-2], [pool, pool]


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
        A network of :func:`build_model`, or any with its features and a head of :data:`HEAD_LAYERS` in
        torchvision's layout (``features``, ``avgpool``, ``classifier``).
    meta: dict
        Metadata (see the module docstring). ``arch``, ``width``, ``batch_norm``, ``num_classes``, ``head`` and
        ``avgpool`` are read off the model (given ones must agree); missing fields get :func:`default_meta`'s
        values.

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
    try:
        recorded = dict(zip(('head', 'avgpool'), head_spec(model)))
    except CheckpointError as error:
        raise CheckpointError(f'{path}: {error}') from None
    for field, value in recorded.items():
        if field in meta and meta[field] != value:
            raise CheckpointError(f'{path}: meta field {field} is {meta[field]!r} but the model has {value!r}')
    meta = {**default_meta(**structure), **meta, **structure, **recorded}
    with torch.device('meta'):
        rebuilt = _build_from_meta(meta)
    problems = _fit_problems(rebuilt.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f'{path}: the model is not a {_describe(structure)} that load_checkpoint can rebuild: {problems}'
        )
    payload = {'format': CHECKPOINT_FORMAT, 'version': CHECKPOINT_VERSION, 'state_dict': state_dict, 'meta': meta}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _build_from_meta(meta):
    """The network a checkpoint's ``meta`` describes, with random weights (:func:`build_model` with its structure
    fields, its ``head`` and ``avgpool`` where recorded)."""
    return build_model(meta['arch'], meta['num_classes'], meta['width'], meta['batch_norm'], meta.get('head'),
                       meta.get('avgpool', (7, 7)))


def _read(path, map_location='cpu'):
    """``torch.load(path, weights_only=True)``, with every failure turned into a :class:`CheckpointError` naming the
    file and saying what it is; a file that needs pickled code is refused, never loaded any other way.

    The path is checked to be a regular file before it is read (a FIFO would block, a folder has no bytes), and a
    TorchScript archive is told apart before torch sees it.
    """
    path = os.fspath(path)
    try:
        file = open_regular_file(path, 'a torch checkpoint')
    except DataError as error:
        raise CheckpointError(f'{path}: ' + ('no such checkpoint file' if error.kind == 'missing file'
                                             else error.reason)) from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise CheckpointError(f'{path}: not a readable torch checkpoint: the file is empty (0 bytes)')
        records = _zip_records(file)
        if 'constants.pkl' in records or any(name.startswith('code/') for name in records):
            raise CheckpointError(
                f'{path}: a TorchScript archive (torch.jit.save), which holds code besides the weights; refused: '
                f'checkpoints are only loaded with torch.load(weights_only=True). Save the weights of the model it '
                f'was scripted from instead, torch.save(model.state_dict(), path), or use '
                f'lrp_brain.model.save_checkpoint'
            )
        try:
            file.seek(0)
            with warnings.catch_warnings():  # a later protocol is reported below, in words
                warnings.filterwarnings('ignore', 'Detected pickle protocol', UserWarning)
                return torch.load(file, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            needed = _globals_needed(file, str(error))
            protocol = _pickle_contents(file)[0]
            if needed:
                raise CheckpointError(
                    f'{path}: refused: loading it needs pickled code ({", ".join(needed)}), and checkpoints are only '
                    f'loaded with torch.load(weights_only=True) because unpickling code can run anything. Save the '
                    f'weights instead, e.g. torch.save(model.state_dict(), path), or use '
                    f'lrp_brain.model.save_checkpoint'
                ) from None
            if protocol >= 4:
                raise CheckpointError(
                    f'{path}: pickled with protocol {protocol}, which torch.load(weights_only=True) does not read; '
                    f'save it again with torch.save at its default pickle protocol (2)'
                ) from None
            raise CheckpointError(f'{path}: not a readable torch checkpoint (corrupt or truncated?): '
                                  f'{_first_line(error)}') from None
        except Exception as error:  # torch.load reports damaged files with many exception types
            raise CheckpointError(f'{path}: not a readable torch checkpoint (corrupt or truncated?): '
                                  f'{_first_line(error)}') from None


def _first_line(error):
    """The cause of a load failure in one line: for the weights-only unpickler its own reason, not torch's advice
    around it (which suggests retrying with ``weights_only=False``, exactly what must not be done with a file of
    unknown origin); of other messages the first line without the sentences that mention ``weights_only``."""
    text = str(error)
    reason = re.search(r'WeightsUnpickler error:\s*(\S.*)', text)
    if reason:
        return reason.group(1)
    sentences = [sentence for sentence in re.split(r'(?<=\.) ', text.splitlines()[0] if text else '')
                 if 'weights_only' not in sentence]
    return ' '.join(sentences) or type(error).__name__


def _zip_records(file):
    """The names of a zip checkpoint's records, without the archive's top folder (``'data.pkl'``, ``'code/...'``);
    empty if ``file`` is no zip."""
    file.seek(0)
    try:
        with zipfile.ZipFile(file) as archive:
            return [name.partition('/')[2] for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):  # RuntimeError: a later zip version
        return []


def _pickle_contents(file):
    """``(protocol, globals)`` of the pickle a checkpoint holds (see :func:`_scan_pickles`): a zip checkpoint's
    ``data.pkl`` record, or the pickles of a legacy one."""
    records = _zip_records(file)
    if 'data.pkl' not in records:
        file.seek(0)
        return _scan_pickles(file)
    try:
        with zipfile.ZipFile(file) as archive, archive.open(archive.namelist()[records.index('data.pkl')]) as stream:
            return _scan_pickles(stream)
    except Exception:  # a record that cannot be opened (damaged, encrypted, an unknown method) tells nothing
        return 0, []


def _scan_pickles(stream, count=4):
    """``(protocol, globals)`` of up to ``count`` pickles in a row in ``stream`` (a legacy checkpoint is a magic
    number, the protocol version, system information and the object), read opcode by opcode with
    :func:`pickletools.genops`, which runs nothing, up to the first that does not parse: the highest protocol, and
    the ``module.name`` of every class or function they import (by ``GLOBAL``, ``INST`` or ``STACK_GLOBAL``, whose
    two strings may come from the memo)."""
    protocol, found, memo, pushed = 0, [], {}, [None, None]
    try:
        for _ in range(count):
            for opcode, argument, _position in pickletools.genops(stream):
                name = opcode.name
                if name == 'PROTO':
                    protocol = max(protocol, argument)
                elif name in ('MEMOIZE', 'PUT', 'BINPUT', 'LONG_BINPUT'):
                    memo[len(memo) if name == 'MEMOIZE' else argument] = pushed[-1]
                elif name != 'FRAME':
                    if name in ('GLOBAL', 'INST'):
                        found.append(argument.replace(' ', '.'))
                    elif name == 'STACK_GLOBAL' and all(isinstance(item, str) for item in pushed):
                        found.append('.'.join(pushed))
                    value = memo.get(argument) if name in ('GET', 'BINGET', 'LONG_BINGET') else argument
                    pushed = [pushed[-1], value if isinstance(value, str) else None]
    except Exception:  # the end of the file, bytes that are no pickle, a damaged zip record: what was read stands
        pass
    return protocol, found


def _globals_needed(file, message):
    """The classes and functions beyond torch's own that a file refused by the weights-only unpickler would import
    (empty if it was refused for being damaged): listed by torch for the zip checkpoints it can disassemble, named in
    its message for the legacy format, else found by :func:`_pickle_contents` (torch reads no pickle of protocol 4
    or later)."""
    file.seek(0)
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # not a zip checkpoint of protocol 2: the legacy format, a later protocol, or damaged
        pass
    return re.findall(r'Unsupported global: GLOBAL (\S+)', message) or [
        name for name in _pickle_contents(file)[1]
        if name.partition('.')[0] != 'torch' and name != 'collections.OrderedDict'
    ]


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
        absent = [field for field in STRUCTURE_FIELDS + USE_FIELDS if field not in meta]
        if absent:
            raise CheckpointError(f'{path}: meta lacks the field(s) {", ".join(absent)}')
    elif _is_state_dict(payload):
        state_dict = payload
        structure = infer_structure(state_dict, source=path)
        head, avgpool = _torchvision_head(state_dict, structure, path)
        meta = {**default_meta(**structure), 'head': head, 'avgpool': avgpool, 'inferred': True, 'source': path}
    else:
        keys = ', '.join(map(repr, list(payload)[:4])) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f'{path}: neither an lrp-brain checkpoint nor a state dict of tensors (found {keys})'
        )
    try:
        with torch.device('meta'):  # the shapes only: metadata naming a huge network allocates nothing
            skeleton = _build_from_meta(meta)
    except CheckpointError as error:
        raise CheckpointError(f'{path}: {error}') from None
    _check_use_fields(path, meta)
    problems = _fit_problems(skeleton.state_dict(), state_dict)
    if problems:
        found, expected = _structure_in_words(state_dict), _describe(meta)
        classifier = _classifier_in_words(state_dict)
        if found == expected and classifier != _classifier_in_words(skeleton.state_dict()):
            # the same VGG with another head: name both heads
            found += f' with classifier {classifier}'
            expected = f'the metadata\'s {expected} with head {describe_head(head_spec(skeleton)[0])}'
        raise CheckpointError(f'{path}: the weights, {found}, do not fit {expected}: {problems}')
    non_finite = _non_finite_problems(state_dict)
    if non_finite:
        raise CheckpointError(f'{path}: the weights are broken: {non_finite}')
    model = _build_from_meta(meta)
    model.load_state_dict(state_dict, strict=False)
    return model.to(map_location).eval(), meta


def _check_use_fields(path, meta):
    """Check the metadata fields of :data:`USE_FIELDS` of the checkpoint ``path``, raising a
    :class:`CheckpointError` naming the file and the field: ``class_names`` one distinct non-empty string per output
    of the network (``num_classes``), ``input_size`` an integer from 1 to the largest side, ``transform`` what
    :meth:`lrp_brain.data.Transform.from_dict` reads."""
    names, count = meta['class_names'], meta['num_classes']
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) and name for name in names):
        raise CheckpointError(f'{path}: meta field class_names must be a list of non-empty strings, got {names!r}')
    if len(names) != count:
        raise CheckpointError(f'{path}: meta field class_names has {len(names)} names ({", ".join(names)}) but the '
                              f'network has {count} outputs (num_classes); give one name per output')
    if len(set(names)) != len(names):
        raise CheckpointError(f'{path}: meta field class_names repeats a name: {names}')
    size = meta['input_size']
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size <= MAX_SIDE:
        raise CheckpointError(f'{path}: meta field input_size must be an integer from 1 to {MAX_SIDE}, got '
                              f'{size!r}')
    try:
        Transform.from_dict(meta['transform'])
    except DataError as error:
        raise CheckpointError(f'{path}: meta field transform: {error}') from None


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


def from_onnx(path, class_names=None, value_range=(0., 1.), mean=None, std=None, inputs=4, seed=0, tolerance=1e-4,
              scaling='minmax'):
    """Convert a VGG-family ONNX model (exported by tf2onnx from Keras, or by ``torch.onnx.export``) to the project's
    network in torchvision's layout, checked against onnxruntime, with the metadata of its checkpoint.

    The graph is read by :func:`lrp_brain.onnx_graph.convert` (which ops, and how they are folded). Its convolutions
    must be those of a VGG :func:`build_model` builds (any depth and width, BatchNorm folded into them); the head is
    kept as found (:func:`head_spec`). The network takes NCHW input whatever the graph's layout (an NHWC graph's
    input Transpose is folded away); ``meta['layout']`` records the graph's. A final Softmax is dropped, since LRP
    explains the logits: ``meta['imported']['softmax_dropped']`` names it. Needs the ``onnx`` extra
    (``pip install "lrp-brain[onnx]"``).

    Parameters
    ----------
    path: str or os.PathLike
        The ``.onnx`` file.
    class_names: sequence of str, optional
        One name per output, in output order; default ``class_0``, ``class_1``, ...
    value_range: tuple of float
        The range the model's input pixels were scaled to before normalisation (``(0, 1)``, or ``(0, 255)`` for a
        model fed raw 8-bit values).
    mean, std: sequence of float, optional
        The per-channel normalisation ``(x - mean) / std`` after the scaling, if the model was trained with one.
    inputs: int
        How many random inputs the conversion is checked on.
    seed: int
        Seeds the random inputs.
    tolerance: float
        The largest difference accepted between the network's logits and onnxruntime's, relative to the largest
        logit: ``max |ours - onnxruntime| / max |onnxruntime|``.
    scaling: str or float
        How the images' pixels are scaled to ``value_range`` (:class:`lrp_brain.data.Transform`): ``'minmax'`` per
        image, or ``'fixed'`` (value / 255 for 8-bit images), as Keras pipelines feed their models.

    Returns
    -------
    model: torch.nn.Module
        In evaluation mode, the network :func:`load_checkpoint` rebuilds from ``meta``.
    meta: dict
        For :func:`save_checkpoint`: the structure, ``head``, ``avgpool``, the class names, the graph's input size,
        the transform (``value_range``, ``mean``, ``std``, from which :func:`lrp_brain.composites.zbox_bounds` derives
        the z^B bounds), ``layout`` and ``imported`` (the file, producer, opset, dropped Softmax, measured difference).

    Raises
    ------
    CheckpointError
        Naming the file and the node or layer at fault: the extra missing, an unreadable file, a node the converter
        does not read, convolutions that are not a VGG's, class names that do not fit the outputs, a difference to
        onnxruntime above ``tolerance`` (with the figure).
    """
    path = os.fspath(path)
    try:
        import onnx
        import onnxruntime

        from lrp_brain import onnx_graph
    except ImportError as error:
        raise CheckpointError(f'{path}: importing an ONNX model needs the onnx extra: pip install "lrp-brain[onnx]" '
                              f'({error})') from None
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such ONNX file')
    try:
        graph = onnx.load(path)
        converted = onnx_graph.convert(graph)
    except onnx_graph.GraphError as error:
        raise CheckpointError(f'{path}: {error}') from None
    except Exception as error:  # onnx reports damaged files with many exception types
        raise CheckpointError(f'{path}: not a readable ONNX model: {_first_line(error)}') from None
    network = VGGNetwork(nn.Sequential(*converted.features), nn.AdaptiveAvgPool2d(converted.pool_size),
                         nn.Sequential(*converted.classifier)).eval()
    structure = infer_structure(network.state_dict(), source=path)
    head, avgpool = head_spec(network)
    names = [str(name) for name in class_names] if class_names is not None else [
        f'class_{index}' for index in range(structure['num_classes'])]
    if len(names) != structure['num_classes']:
        raise CheckpointError(f'{path}: {len(names)} class names ({", ".join(names)}) for a network with '
                              f'{structure["num_classes"]} outputs')
    try:
        transform = Transform(size=converted.input_size, value_range=value_range, mean=mean, std=std,
                              scaling=scaling)
    except DataError as error:
        raise CheckpointError(f'{path}: {error}') from None
    meta = {
        **default_meta(**structure), 'class_names': names, 'input_size': converted.input_size,
        'transform': transform.to_dict(), 'head': head, 'avgpool': avgpool, 'layout': converted.layout,
        'imported': {
            'format': 'onnx', 'file': path, 'producer': f'{graph.producer_name} {graph.producer_version}'.strip(),
            'opset': max((item.version for item in graph.opset_import if item.domain in ('', 'ai.onnx')), default=0),
            'input': converted.input_name, 'softmax_dropped': converted.softmax,
        },
    }
    with torch.device('meta'):
        skeleton = _build_from_meta(meta)
    _check_features(path, skeleton.features, network.features, converted.feature_nodes, structure)
    model = _build_from_meta(meta)
    model.load_state_dict(network.state_dict())
    model.eval()
    try:
        difference, count = _onnxruntime_difference(onnx, onnxruntime, graph, converted, model, transform, inputs,
                                                    seed)
    except CheckpointError as error:
        raise CheckpointError(f'{path}: {error}') from None
    if not difference <= tolerance:
        raise CheckpointError(
            f'{path}: refused: the converted network differs from onnxruntime by {difference:.3g} of the largest '
            f'logit on {count} random inputs (tolerance {tolerance:g}); the graph computes something this '
            f'conversion does not reproduce'
        )
    meta['imported'].update(onnxruntime_difference=difference, checked_inputs=count)
    return model, meta


def _check_features(path, expected, found, nodes, structure):
    """Raise naming the graph node whose layer differs from the one :func:`build_model`'s VGG has at its place."""
    expected, found = list(expected), list(found)
    for index in range(max(len(expected), len(found))):
        want = repr(expected[index]) if index < len(expected) else 'nothing'
        have = repr(found[index]) if index < len(found) else 'nothing'
        if want != have:
            source = f' (node {nodes[index]!r})' if index < len(found) else ''
            raise CheckpointError(f'{path}: features.{index} of the graph is {have}{source}, but a '
                                  f'{_describe(structure)} has {want} there')


def _onnxruntime_difference(onnx, onnxruntime, graph, converted, model, transform, inputs, seed):
    """``max |model - onnxruntime| / max |onnxruntime|`` of the logits on random inputs uniform between the z^B
    bounds of ``transform`` (fed to onnxruntime in the graph's layout), and the number of inputs. A dropped Softmax's
    input is added to ``graph``'s outputs."""
    if converted.softmax:  # compare the logits, not the probabilities: ask onnxruntime for the Softmax's input
        element_type = graph.graph.output[0].type.tensor_type.elem_type
        graph.graph.output.append(onnx.helper.make_tensor_value_info(converted.logits, element_type, None))
    batch = converted.input_shape[0] or inputs
    count = batch * -(-inputs // batch)
    low, high = zbox_bounds(transform)
    size = converted.input_size
    images = low + (high - low) * torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    input_type = onnx.helper.tensor_dtype_to_np_dtype(
        next(item for item in graph.graph.input if item.name == converted.input_name).type.tensor_type.elem_type)
    largest = difference = 0.
    try:
        session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=['CPUExecutionProvider'])
        for chunk in images.split(batch):
            with torch.no_grad():
                ours = model(chunk.float()).double()
            fed = (chunk.permute(0, 2, 3, 1) if converted.layout == 'NHWC' else chunk).numpy().astype(input_type)
            theirs = torch.from_numpy(session.run([converted.logits], {converted.input_name: fed})[0]).double()
            largest = max(largest, float(theirs.abs().max()))
            difference = max(difference, float((ours - theirs.reshape(ours.shape)).abs().max()))
    except Exception as error:  # onnxruntime's own exception types
        raise CheckpointError(f'onnxruntime cannot run the graph: {_first_line(error)}') from None
    return difference / largest if largest > 0 else difference, count


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
