"""Sanity checks of relevance maps: do they depend on the model's weights, and on the class they explain?

**Model-parameter randomisation** (Adebayo et al., NeurIPS 2018, "cascading randomisation"): the weights of a deep
copy of the model are re-initialised one layer group at a time, from the output down, and after each group the maps
of the same images for the same target classes are compared with the original model's. Maps that stay similar while
the model becomes random show the input more than the model. The groups are the blocks the LRP rule mapping knows
(:func:`lrp_brain.composites.layer_groups`, read from the order of the leaf modules, not from indices or names): a
*group* is every leaf module with parameters of one stage, either ``'classifier'``, all the fully connected layers
after the last convolution together, or ``'blockB'``, the convolutions (with their BatchNorms) of conv block ``B``,
those after the ``(B−1)``-th max-pool up to the ``B``-th. The cascade is ``classifier, block5, …, block1`` for
VGG16; stage ``i`` has the first ``i`` groups randomised, stage 0 is the original model. Re-initialisation is the one
torchvision gives a fresh VGG — convolutions Kaiming-normal (fan-out, ReLU), linear layers N(0, 0.01²), biases 0,
BatchNorms the identity (weight 1, bias 0, running mean 0, variance 1) — drawn from a CPU ``torch.Generator`` seeded
with ``seed`` (the same weights on every device), group after group.

**Class sensitivity**: the maps of every class for the same image compared with each other; maps that barely change
with the class explain the image, not the decision. (Sixt et al., ICML 2020, show that LRP-z⁺-like rules converge to a
class-independent map in deep networks.)

**Similarity** of two maps ``a``, ``b`` of an image, each summed over channels first (``(H, W)``):

- ``spearman``: Spearman's rank correlation of the signed maps (Pearson correlation of the ranks, tied values
  sharing their mean rank, as ``scipy.stats.spearmanr``);
- ``spearman_abs``: the same of ``|a|`` and ``|b|``;
- ``ssim``: scikit-image's structural similarity (``structural_similarity``, 7 × 7 window, or the largest odd one
  that fits a smaller map, ``data_range=1``) of ``|a| / max|a|`` and ``|b| / max|b|``, each scaled to [0, 1] (an
  all-zero map stays 0).

A rank correlation is NaN where a map is constant (all ranks tied): it says nothing about the ordering.

Known limits of the randomisation test (Binder et al., CVPR 2023, "Shortcomings of top-down randomization-based sanity
checks"): a randomised network is not a neutral reference — its random features still respond to the input's
structure, so a similarity that stays high need not mean a bad explanation; the randomised model's output is mostly
noise, so the maps are explaining a different function; and a similarity of 0 is not the goal either (an edge detector
would fail the test and a random map pass it). The test rules out explanations that ignore the weights, no more.
"""
import copy
import math
from dataclasses import dataclass
from numbers import Integral

import torch
from skimage.metrics import structural_similarity
from torch import nn

from lrp_brain.canonizers import leaf_modules
from lrp_brain.composites import layer_groups as rule_groups
from lrp_brain.contrast import check_contrast
from lrp_brain.explain import explain

#: The similarity measures of :func:`map_similarity`.
MEASURES = ('spearman', 'spearman_abs', 'ssim')

#: The window of the SSIM (scikit-image's default); smaller maps use the largest odd side that fits.
SSIM_WINDOW = 7

#: The layers the cascade re-initialises (any other layer with parameters is refused).
RANDOMISABLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)

#: The standard deviation of re-initialised linear weights (torchvision's VGG initialisation).
LINEAR_WEIGHT_STD = 0.01

#: The methods the randomisation test gives ``contrast`` to; the gradient methods stay the plain reference.
CONTRASTED = ('lrp', 'zennit-egb')


class SanityError(ValueError):
    """An input the sanity checks cannot run on: a model with layers the cascade cannot randomise, a bad map or
    parameter."""


@dataclass(frozen=True)
class LayerGroup:
    """Modules randomised together.

    Attributes
    ----------
    name: str
        ``'classifier'`` or ``'blockB'``.
    modules: tuple of str
        The names (``model.named_modules()``) of its modules with parameters.
    """
    name: str
    modules: tuple


def layer_groups(model):
    """The layer groups of the randomisation cascade, in its order: the classifier, then the conv blocks from the last
    down (see the module's docstring).

    Raises
    ------
    SanityError
        For a model with parameters outside its leaf modules (which no group holds, so the cascade would never randomise
        them), or in a leaf module that is not a convolution, linear layer or BatchNorm.
    """
    for name, module in model.named_modules():
        if list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            raise SanityError(f'{name or "the model"} ({type(module).__name__}) holds parameters of its own, outside '
                              f'its leaf layers; the randomisation test randomises layers only')
    leaves = leaf_modules(model)
    blocks = {}
    for (name, module), (_, _, block) in zip(leaves, rule_groups(leaves)):
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if not isinstance(module, RANDOMISABLE):
            raise SanityError(f'cannot re-initialise {name} ({type(module).__name__}): the randomisation test knows '
                              f'convolutions, linear layers and BatchNorms')
        blocks.setdefault(block, []).append(name)
    order = sorted(blocks, key=lambda block: (block != 0, -block))  # block 0: the layers after the last conv block
    return tuple(LayerGroup('classifier' if block == 0 else f'block{block}', tuple(blocks[block])) for block in order)


def _reinitialise(module, generator):
    """Re-initialise ``module``'s parameters as torchvision's VGG does, drawing on the CPU from ``generator``."""
    def draw(parameter, init):
        fresh = torch.empty(parameter.shape, dtype=parameter.dtype)
        init(fresh)
        parameter.copy_(fresh)

    if isinstance(module, nn.modules.conv._ConvNd):
        draw(module.weight, lambda tensor: nn.init.kaiming_normal_(tensor, mode='fan_out', nonlinearity='relu',
                                                                    generator=generator))
    elif isinstance(module, nn.Linear):
        draw(module.weight, lambda tensor: nn.init.normal_(tensor, 0., LINEAR_WEIGHT_STD, generator=generator))
    else:
        module.reset_running_stats()
        if module.affine:
            module.weight.fill_(1.)
    if module.bias is not None:
        module.bias.zero_()


def randomised_models(model, seed=0):
    """Yield the cascade: the groups of :func:`layer_groups` re-initialised one after another on a deep copy.

    Yields
    ------
    group: LayerGroup
        The group just randomised.
    model: torch.nn.Module
        The copy with this group and all before it randomised (the same object each time, changed in place; copy it
        to keep a stage). ``model`` itself is never changed.
    """
    groups = layer_groups(model)
    generator = torch.Generator().manual_seed(seed)
    randomised = copy.deepcopy(model)
    modules = dict(randomised.named_modules())
    for group in groups:
        with torch.no_grad():
            for name in group.modules:
                _reinitialise(modules[name], generator)
        yield group, randomised


def _channel_sums(maps):
    """``(N, C, H, W)`` or ``(N, H, W)`` maps as float64 ``(N, H, W)`` on the CPU, checked finite."""
    maps = torch.as_tensor(maps).detach().cpu().double()
    if maps.ndim == 4:
        maps = maps.sum(1)
    if maps.ndim != 3:
        raise SanityError(f'maps must be shaped (N, C, H, W) or (N, H, W), got {tuple(maps.shape)}')
    finite = maps.isfinite().flatten(1).all(1)
    if not finite.all():
        raise SanityError(f'map of image {(~finite).nonzero().flatten().tolist()} contains NaN or inf values')
    return maps


def average_ranks(values):
    """The rank (0-based) of every value in its row, tied values sharing the mean of their ranks; float64 ``(N, P)``."""
    count = values.shape[1]
    ordered, order = values.sort(dim=1, stable=True)
    new_value = torch.ones_like(ordered, dtype=torch.bool)
    new_value[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    tie = new_value.cumsum(1) - 1
    position = torch.arange(count, dtype=torch.float64).expand_as(ordered)
    first = torch.full_like(position, float(count)).scatter_reduce(1, tie, position, 'amin')
    last = torch.zeros_like(position).scatter_reduce(1, tie, position, 'amax')
    return torch.empty_like(position).scatter_(1, order, ((first + last) / 2).gather(1, tie))


def spearman(a, b):
    """Spearman's rank correlation of the rows of ``a`` and ``b`` (``(N, P)``), float64 ``(N,)``; NaN for a constant
    row."""
    ranks_a, ranks_b = average_ranks(a), average_ranks(b)
    ranks_a = ranks_a - ranks_a.mean(1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(1, keepdim=True)
    norm = ranks_a.norm(dim=1) * ranks_b.norm(dim=1)
    return (ranks_a * ranks_b).sum(1) / norm.masked_fill(norm == 0, math.nan)


def _scaled_absolute(maps):
    peak = maps.abs().flatten(1).amax(1).reshape(-1, 1, 1)
    return maps.abs() / peak.masked_fill(peak == 0, 1.)


def map_similarity(reference, maps):
    """The similarity of every map to its reference map (definitions in the module's docstring).

    Parameters
    ----------
    reference, maps: torch.Tensor
        ``(N, C, H, W)`` or ``(N, H, W)``, one map per image, the same shape.

    Returns
    -------
    dict of str to torch.Tensor
        Float64 ``(N,)`` for each of :data:`MEASURES`.
    """
    reference, maps = _channel_sums(reference), _channel_sums(maps)
    if reference.shape != maps.shape:
        raise SanityError(f'maps {tuple(maps.shape)} and reference maps {tuple(reference.shape)} differ in shape')
    window = min(SSIM_WINDOW, *(side - (side + 1) % 2 for side in reference.shape[1:]))
    if window < 3:
        raise SanityError(f'maps of {tuple(reference.shape[1:])} pixels are too small for the SSIM (3 × 3 at least)')
    scaled_reference, scaled = _scaled_absolute(reference).numpy(), _scaled_absolute(maps).numpy()
    return {
        'spearman': spearman(reference.flatten(1), maps.flatten(1)),
        'spearman_abs': spearman(reference.abs().flatten(1), maps.abs().flatten(1)),
        'ssim': torch.tensor([
            structural_similarity(first, second, win_size=window, data_range=1.)
            for first, second in zip(scaled_reference, scaled)
        ], dtype=torch.float64),
    }


def _nan_to_none(values):
    return [None if isinstance(value, float) and math.isnan(value) else value for value in values]


@dataclass(frozen=True)
class RandomisationResult:
    """How similar each method's maps stay to the original model's as the cascade randomises the model.

    Attributes
    ----------
    stages: tuple of str
        ``'original'``, then the group randomised at each stage (stage ``i`` has ``stages[1:i+1]`` randomised).
    methods: tuple of str
        The attribution methods (:data:`lrp_brain.explain.METHODS`).
    similarity: dict
        ``{method: {measure: float64 (len(stages), N)}}``, row 0 the original maps against themselves.
    targets: torch.Tensor
        ``(N,)``, the class every map explains (resolved on the original model).
    settings: dict
        ``epsilon``, ``gamma``, ``seed``: what made the maps and the random weights; ``contrast``: each method's.
    """
    stages: tuple
    methods: tuple
    similarity: dict
    targets: torch.Tensor
    settings: dict

    def summary(self):
        """``{method: {measure: [mean over the images per stage]}}``, NaN values (constant maps) left out."""
        return {method: {measure: values.nanmean(1).tolist() for measure, values in measures.items()}
                for method, measures in self.similarity.items()}

    def to_dict(self):
        """Everything as plain lists and numbers for JSON, NaN as ``None``."""
        return {
            'stages': list(self.stages),
            'methods': list(self.methods),
            'settings': dict(self.settings),
            'targets': self.targets.tolist(),
            'mean': {method: {measure: _nan_to_none(values) for measure, values in measures.items()}
                     for method, measures in self.summary().items()},
            'per_image': {method: {measure: [_nan_to_none(row) for row in values.tolist()]
                                   for measure, values in measures.items()}
                          for method, measures in self.similarity.items()},
        }


def _check_methods(methods):
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods or len(set(methods)) != len(methods):
        raise SanityError(f'methods must be distinct attribution methods, got {methods!r}')
    return methods


def _explanations(model, images, target, labels, method, settings, contrast=None):
    """:func:`lrp_brain.explain.explain` with the LRP settings where the method takes them, and ``contrast``."""
    composite_kwargs = settings['composite_kwargs'] if method in ('lrp', 'zennit-egb') else None
    return explain(model, images, target=target, labels=labels, method=method, epsilon=settings['epsilon'],
                   gamma=settings['gamma'], low=settings['low'], high=settings['high'],
                   batch_size=settings['batch_size'], device=settings['device'], composite_kwargs=composite_kwargs,
                   contrast=contrast)


def randomisation_test(model, images, target='label', labels=None, *, methods=('lrp', 'gradient'), epsilon=0.25,
                       gamma=0.1, low=0., high=1., seed=0, batch_size=16, device='cpu', composite_kwargs=None,
                       contrast=None):
    """The cascading model-parameter randomisation test (see the module's docstring).

    Parameters
    ----------
    model: torch.nn.Module
        A VGG-like classifier (:func:`layer_groups`); never changed (the cascade runs on a deep copy).
    images: torch.Tensor
        ``(N, C, H, W)``, as :func:`lrp_brain.explain.explain` takes them.
    target, labels:
        The class to explain, as for :func:`~lrp_brain.explain.explain`; resolved once on the original model
        (``'pred'`` is the original prediction) and kept for every stage.
    methods: sequence of str
        Attribution methods of :func:`~lrp_brain.explain.explain`; the gradient is the reference the study compares
        LRP with.
    epsilon, gamma, low, high, batch_size, device, composite_kwargs:
        As for :func:`~lrp_brain.explain.explain` (``composite_kwargs`` for the LRP methods only).
    seed: int
        Seeds the re-initialisation.
    contrast: str, optional
        The output relevance (:mod:`lrp_brain.contrast`) of the maps of the methods in :data:`CONTRASTED`; the
        gradient methods stay the plain reference.

    Returns
    -------
    RandomisationResult

    Raises
    ------
    SanityError
        For a model the cascade cannot randomise (:func:`layer_groups`, :func:`randomised_models`), repeated or no
        methods, a seed that is not an integer, maps too small for
        the SSIM. :class:`~lrp_brain.explain.ExplainError` for what :func:`~lrp_brain.explain.explain` refuses.
    """
    methods = _check_methods(methods)
    if not isinstance(seed, Integral) or isinstance(seed, bool):
        raise SanityError(f'seed must be an integer, got {seed!r}')
    groups = layer_groups(model)
    settings = dict(epsilon=epsilon, gamma=gamma, low=low, high=high, batch_size=batch_size, device=device,
                    composite_kwargs=composite_kwargs)
    contrast = check_contrast(contrast)
    contrasts = {method: contrast if method in CONTRASTED else None for method in methods}
    originals, targets = {}, None
    for method in methods:
        explanation = _explanations(model, images, target if targets is None else targets, labels, method, settings,
                                    contrasts[method])
        targets = explanation.targets if targets is None else targets
        originals[method] = explanation.relevance
    similarity = {method: {measure: [values] for measure, values in map_similarity(maps, maps).items()}
                  for method, maps in originals.items()}
    for _, randomised in randomised_models(model, seed):
        for method in methods:
            maps = _explanations(randomised, images, targets, None, method, settings, contrasts[method]).relevance
            for measure, values in map_similarity(originals[method], maps).items():
                similarity[method][measure].append(values)
    return RandomisationResult(
        stages=('original',) + tuple(group.name for group in groups),
        methods=methods,
        similarity={method: {measure: torch.stack(rows) for measure, rows in measures.items()}
                    for method, measures in similarity.items()},
        targets=targets,
        settings={'epsilon': float(epsilon), 'gamma': float(gamma), 'seed': int(seed), 'contrast': contrasts},
    )


@dataclass(frozen=True)
class ClassSensitivity:
    """How similar the maps of different classes are for the same image.

    Attributes
    ----------
    similarity: dict
        ``{measure: float64 (N, K, K)}``: entry ``[n, i, j]`` compares image ``n``'s maps for classes ``i`` and ``j``
        (symmetric; the diagonal compares a map with itself).
    mean: dict
        ``{measure: float64 (N,)}``: the mean over the ``K (K − 1) / 2`` pairs of different classes; a map that does
        not depend on the class gives 1.
    settings: dict
        ``method``, ``epsilon``, ``gamma``, ``contrast``.
    """
    similarity: dict
    mean: dict
    settings: dict

    def to_dict(self):
        """Everything as plain lists and numbers for JSON, NaN as ``None``."""
        return {
            'settings': dict(self.settings),
            'mean_over_images': {measure: _nan_to_none([values.nanmean().item()])[0]
                                 for measure, values in self.mean.items()},
            'per_image': {measure: _nan_to_none(values.tolist()) for measure, values in self.mean.items()},
        }


def compare_classes(maps):
    """The similarity of every pair of class maps of each image.

    Parameters
    ----------
    maps: sequence of torch.Tensor
        ``K >= 2`` maps ``(N, C, H, W)`` or ``(N, H, W)``, map ``k`` explaining class ``k`` of each image.

    Returns
    -------
    similarity, mean: dict
        As :class:`ClassSensitivity` holds them.
    """
    classes, count = len(maps), len(maps[0])
    if classes < 2:
        raise SanityError(f'class sensitivity needs a model with two classes or more, got {classes}')
    similarity = {measure: torch.ones(count, classes, classes, dtype=torch.float64) for measure in MEASURES}
    pairs = [(i, j) for i in range(classes) for j in range(i + 1, classes)]
    for i, j in pairs:
        for measure, values in map_similarity(maps[i], maps[j]).items():
            similarity[measure][:, i, j] = similarity[measure][:, j, i] = values
    mean = {measure: torch.stack([values[:, i, j] for i, j in pairs], 1).mean(1)
            for measure, values in similarity.items()}
    return similarity, mean


def class_sensitivity(model, images, *, method='lrp', epsilon=0.25, gamma=0.1, low=0., high=1., batch_size=16,
                      device='cpu', composite_kwargs=None, contrast=None):
    """Compare every image's maps for each class of the model (see the module's docstring).

    Parameters
    ----------
    model: torch.nn.Module
        A classifier with ``K >= 2`` classes.
    images: torch.Tensor
        ``(N, C, H, W)``.
    method, epsilon, gamma, low, high, batch_size, device, composite_kwargs, contrast:
        As for :func:`lrp_brain.explain.explain` (``contrast``: the output relevance of every class's map).

    Returns
    -------
    ClassSensitivity

    Raises
    ------
    SanityError
        For a model with one class (:class:`~lrp_brain.contrast.ContrastError` with a contrast).
        :class:`~lrp_brain.explain.ExplainError` for what :func:`~lrp_brain.explain.explain` refuses.
    """
    settings = dict(epsilon=epsilon, gamma=gamma, low=low, high=high, batch_size=batch_size, device=device,
                    composite_kwargs=composite_kwargs)
    contrast = check_contrast(contrast, method)
    first = _explanations(model, images, 0, None, method, settings, contrast)
    maps = [first.relevance] + [_explanations(model, images, index, None, method, settings, contrast).relevance
                                for index in range(1, first.logits.shape[1])]
    similarity, mean = compare_classes(maps)
    return ClassSensitivity(similarity, mean, {'method': method, 'epsilon': float(epsilon), 'gamma': float(gamma),
                                               'contrast': contrast})
