"""Localisation metrics: how well the most relevant pixels of an explanation cover the tumour.

Every metric reads one map per image, the *positive map* ``P = max(sum_c R_c, 0)``: the relevance summed over the
colour channels, negative evidence set to zero. Metrics that need a binary map compare the *selection*

    ``S = {pixels with P > t}``,  ``t = quantile(P, q)``

with the ground truth ``G = {pixels with mask >= 0.5}``. The quantile runs over all ``H·W`` pixels of ``P`` (the
zeros included) and interpolates linearly between order statistics, exactly as ``numpy.quantile(P, q)`` (its default
``method='linear'``); it is computed per image from one sort, so it has no input-size limit (``torch.quantile`` stops
at 2**24 elements).

Tie rule: a pixel is selected only if it lies *strictly* above the threshold; pixels equal to ``t`` never are.
Consequences:

- a constant map selects nothing, whatever its value; in particular a map without positive relevance (``P = 0``);
- a map whose zeros reach past the quantile (e.g. 95 % zeros, ``q = 0.9``) has ``t = 0`` and selects exactly its
  positive pixels, fewer than ``(1 - q)·H·W``;
- ``q = 1`` selects nothing; ``q = 0`` selects every pixel above the map's minimum.

Metrics, per image, with ``TP = |S ∩ G|``, ``FP = |S \\ G|``, ``FN = |G \\ S|``, ``TN`` the rest:

=================  ===========================================================================================
``iou``            ``TP / (TP + FP + FN)``
``precision``      ``TP / (TP + FP)``
``recall``         ``TP / (TP + FN)``
``f1``             ``2 TP / (2 TP + FP + FN)``, which equals ``2 PR / (P + R)`` and ``2 IoU / (1 + IoU)``
``pixel_accuracy`` ``(TP + TN) / (H W)``
``pointing_game``  1 if ``max P`` inside ``G`` is strictly greater than ``max P`` outside ``G`` (the maximum over
                   no pixels being ``-inf``), else 0: a maximum shared by a pixel inside and one outside is a miss
``mass_accuracy``  ``sum of P inside G / sum of P``
``rank_accuracy``  the fraction of the ``K = |G|`` highest pixels of ``P`` that lie in ``G``; the pixels tied with
                   the ``K``-th highest value share the places left equally (the expected value under random
                   tie breaking), so a constant map scores the chance level ``K / (H W)``
=================  ===========================================================================================

Undefined values are NaN and flagged, never a silent 0 or 1; :func:`summarize` excludes NaN values from its
statistics and counts them:

- ``empty_mask`` (``G`` is empty): every metric is NaN.
- ``empty_selection`` (``S`` is empty): precision is NaN (0 / 0); IoU, recall and F1 are 0 (a mask was missed).
- ``no_positive`` (``P = 0`` everywhere, which implies ``empty_selection``): as above, and mass accuracy is NaN
  (0 / 0); the pointing game and rank accuracy keep their definitions (a miss unless ``G`` covers the image, and the
  chance level).

Shapes and types: ``relevance`` is (N, C, H, W), (N, H, W) (channels already summed) or (H, W); ``mask`` is
(N, H, W) or (H, W), any real or boolean dtype. A single (H, W) map is a batch of one. Everything is computed in
float64 on the relevance's device (CPU or CUDA, no loop over pixels), and per-image results are float64 tensors
shaped (N,).

Errors (:class:`MetricError`): NaN or inf in the relevance or the mask names the image (by index, and by name when
``names`` is given); relevance and mask of different sizes are an error unless ``resize=True``, which resizes the
channel-summed relevance (before its positive part is taken) to the mask's size by bilinear interpolation with
antialiasing (``torch.nn.functional.interpolate(mode='bilinear', antialias=True)``): an area-weighted average when
shrinking, bilinear interpolation when enlarging.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Mask values at or above this are tumour.
MASK_THRESHOLD = 0.5

#: The per-image localisation metrics of :func:`evaluate_maps`, in the column order of the outputs.
METRICS = ('iou', 'precision', 'recall', 'f1', 'pixel_accuracy', 'pointing_game', 'mass_accuracy', 'rank_accuracy')

#: The flags of :func:`evaluate_maps`: why an image may be left out of a metric's mean.
FLAGS = ('empty_mask', 'empty_selection', 'no_positive')


class MetricError(ValueError):
    """An input the localisation metrics cannot evaluate: a wrong shape, a non-finite value, a bad parameter."""


class IoUCurve(NamedTuple):
    """IoU as a function of the selection quantile.

    Attributes
    ----------
    quantiles: torch.Tensor
        The quantiles, float64 shaped (Q,).
    iou: torch.Tensor
        IoU per image and quantile, float64 shaped (N, Q); rows of images with an empty mask are NaN.
    area: torch.Tensor
        The area under each image's curve (trapezoid rule) divided by the span of the quantiles, float64 (N,).
    """
    quantiles: torch.Tensor
    iou: torch.Tensor
    area: torch.Tensor


def _image_labels(indices, names):
    """Name images by index, and by name where ``names`` is given, for error messages."""
    return ', '.join(f'{index} ({names[index]!r})' if names is not None else str(index) for index in indices)


def _check_finite(batch, what, names):
    """Raise a :class:`MetricError` naming the images of ``batch`` (N, ...) that hold NaN or inf."""
    finite = batch.isfinite().flatten(1).all(1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise MetricError(f'{what} of image {_image_labels(bad, names)} contains NaN or inf values')


def _check_quantiles(quantiles, device):
    """Return ``quantiles`` as a float64 tensor shaped (Q,) on ``device``, each value checked to lie in [0, 1]."""
    flat = torch.as_tensor(quantiles, dtype=torch.float64).detach().to(device).reshape(-1)
    if len(flat) == 0 or not ((flat >= 0) & (flat <= 1)).all():
        raise MetricError(f'quantiles must lie in [0, 1], got {quantiles}')
    return flat


def check_selection_quantile(quantile):
    """Return the quantile of a run's relevance mask as a float, checked to lie in [0, 1): above the 1 quantile (the
    largest value) no pixel is selected, so every map would score as if it missed the tumour.

    Raises
    ------
    MetricError
        Naming the value.
    """
    try:
        value = float(quantile)
    except (TypeError, ValueError):
        raise MetricError(f'quantile must be a number in [0, 1), got {quantile!r}') from None
    if not 0 <= value < 1:
        raise MetricError(f'quantile must lie in [0, 1), got {quantile!r}'
                          + ('; the mask above the 1 quantile (the largest value) selects no pixel' if value == 1
                             else ''))
    return value


def positive_map(relevance, size=None, names=None):
    """The map every metric reads: relevance summed over channels, resized if asked, negative part set to zero.

    Parameters
    ----------
    relevance: torch.Tensor or array
        Shaped (N, C, H, W), (N, H, W) or (H, W).
    size: tuple of int, optional
        ``(height, width)`` to resize the channel sum to (bilinear, antialiased), before its positive part is taken.
    names: sequence of str, optional
        One name per image, used in error messages.

    Returns
    -------
    torch.Tensor
        ``max(sum_c R_c, 0)``, float64 shaped (N, H, W) (N = 1 for an (H, W) input), on the relevance's device.

    Raises
    ------
    MetricError
        For a wrong number of dimensions, a ``names`` of the wrong length, or NaN/inf values (naming the images).
    """
    relevance = torch.as_tensor(relevance).detach()
    if relevance.ndim not in (2, 3, 4):
        raise MetricError(
            f'relevance must be shaped (N, C, H, W), (N, H, W) or (H, W), got {tuple(relevance.shape)}'
        )
    batch = relevance[None] if relevance.ndim == 2 else relevance
    if names is not None and len(names) != len(batch):
        raise MetricError(f'{len(names)} names given for {len(batch)} relevance maps')
    _check_finite(batch, 'relevance', names)
    summed = batch.to(torch.float64)
    if relevance.ndim == 4:
        summed = summed.sum(1)
    if size is not None and tuple(size) != tuple(summed.shape[-2:]):
        summed = F.interpolate(
            summed[:, None], size=tuple(size), mode='bilinear', antialias=True, align_corners=False
        )[:, 0]
    return summed.clamp(min=0)


def relevance_mask(relevance, quantile=0.9):
    """The selection: pixels of the positive map strictly above its ``quantile`` (see the module's tie rule).

    Parameters
    ----------
    relevance: torch.Tensor or array
        Shaped (N, C, H, W), (N, H, W) or (H, W).
    quantile: float
        In [0, 1]; the study's top 5 % is ``0.95``.

    Returns
    -------
    torch.Tensor
        Boolean, shaped (N, H, W).
    """
    positive = positive_map(relevance)
    values, _ = positive.flatten(1).sort(dim=1)
    threshold = _thresholds(values, _check_quantiles(quantile, values.device)[:1])
    return positive > threshold[:, :, None]


def _thresholds(values, quantiles):
    """Quantiles (Q,) of each row of ``values`` (N, P), sorted ascending; ``numpy.quantile``'s linear method.

    The virtual index ``q (P - 1)`` falls between the order statistics ``floor`` and ``floor + 1``; ``torch.lerp``
    interpolates between them with the same two-sided formula as numpy, so the thresholds agree to the last bit.
    """
    last = values.shape[1] - 1
    position = quantiles * last
    below = position.floor().long()
    above = (below + 1).clamp(max=last)
    return torch.lerp(values[:, below], values[:, above], (position - below).expand(len(values), -1))


def _prepare(relevance, mask, resize, names):
    """Check the inputs; return the positive maps (N, H, W) float64 and the ground truth (N, H, W) bool."""
    mask = torch.as_tensor(mask).detach()
    if mask.ndim not in (2, 3):
        raise MetricError(f'mask must be shaped (N, H, W) or (H, W), got {tuple(mask.shape)}')
    mask_size = tuple(mask.shape[-2:])
    positive = positive_map(relevance, size=mask_size if resize else None, names=names)
    if tuple(positive.shape[-2:]) != mask_size:
        raise MetricError(
            f'relevance is {tuple(positive.shape[-2:])} pixels but the mask is {mask_size}; pass resize=True to '
            'resize the relevance to the mask'
        )
    mask = mask.reshape(-1, *mask_size).to(device=positive.device, dtype=torch.float64)
    if len(mask) != len(positive):
        raise MetricError(f'{len(positive)} relevance maps but {len(mask)} masks')
    _check_finite(mask, 'mask', names)
    return positive, mask >= MASK_THRESHOLD


def _rank(positive, truth):
    """Sort each image's pixels by positive relevance; count ground-truth pixels from each sorted position on.

    Returns
    -------
    values: torch.Tensor
        (N, P) the positive map's values in ascending order.
    truth_from: torch.Tensor
        (N, P + 1) int64; ``truth_from[n, i]`` is the number of ground-truth pixels among sorted positions
        ``i, ..., P - 1``, so ``truth_from[:, 0] = |G|`` and ``truth_from[:, P] = 0``.
    """
    values, order = positive.flatten(1).sort(dim=1)
    truth_sorted = truth.flatten(1).gather(1, order).long()
    truth_from = F.pad(truth_sorted.flip(1).cumsum(1).flip(1), (0, 1))
    return values, truth_from


def _selection_scores(values, truth_from, quantiles):
    """The binary-map metrics per image and quantile.

    Returns a dict of scores, the thresholds and the empty-selection flags, each shaped (N, Q).
    """
    pixel_count = values.shape[1]
    thresholds = _thresholds(values, quantiles)
    # S is a suffix of the sorted pixels: it starts at the first value strictly above t
    first_selected = torch.searchsorted(values, thresholds.contiguous(), right=True)
    truth_count = truth_from[:, :1].double()
    true_positive = truth_from.gather(1, first_selected).double()
    false_positive = (pixel_count - first_selected) - true_positive
    false_negative = truth_count - true_positive
    true_negative = pixel_count - true_positive - false_positive - false_negative
    scores = {
        'iou': true_positive / (true_positive + false_positive + false_negative),
        'precision': true_positive / (true_positive + false_positive),
        'recall': true_positive / truth_count,
        'f1': 2 * true_positive / (2 * true_positive + false_positive + false_negative),
        'pixel_accuracy': (true_positive + true_negative) / pixel_count,
    }
    scores = {key: score.masked_fill(truth_count == 0, math.nan) for key, score in scores.items()}
    return scores, thresholds, first_selected == pixel_count


def _ranking_scores(positive, truth, values, truth_from):
    """Pointing game, relevance mass accuracy and relevance rank accuracy per image, each (N,)."""
    flat, inside = positive.flatten(1), truth.flatten(1)
    maximum_inside = flat.masked_fill(~inside, -math.inf).amax(1)
    maximum_outside = flat.masked_fill(inside, -math.inf).amax(1)

    pixel_count = values.shape[1]
    truth_count = truth_from[:, 0]
    # the K-th highest value v, the block of sorted positions [first_tied, first_above) holding v, and the pixels
    # above it; those tied with v fill the K - |above| places left, each with the same chance
    kth_value = values.gather(1, (pixel_count - truth_count).clamp(max=pixel_count - 1)[:, None])
    first_tied = torch.searchsorted(values, kth_value, right=False)
    first_above = torch.searchsorted(values, kth_value, right=True)
    truth_above = truth_from.gather(1, first_above)[:, 0].double()
    truth_tied = truth_from.gather(1, first_tied)[:, 0] - truth_above
    places_left = truth_count - (pixel_count - first_above[:, 0])
    tied_count = (first_above - first_tied)[:, 0]

    scores = {
        'pointing_game': (maximum_inside > maximum_outside).double(),
        'mass_accuracy': (flat * inside).sum(1) / flat.sum(1),
        'rank_accuracy': (truth_above + places_left * truth_tied / tied_count) / truth_count,
    }
    return {key: score.masked_fill(truth_count == 0, math.nan) for key, score in scores.items()}


def evaluate_maps(relevance, mask, quantile=0.9, *, resize=False, names=None):
    """Every localisation metric of every image in one pass (definitions in the module's docstring).

    Parameters
    ----------
    relevance: torch.Tensor or array
        Shaped (N, C, H, W), (N, H, W) or (H, W).
    mask: torch.Tensor or array
        Ground truth shaped (N, H, W) or (H, W); values >= 0.5 are tumour.
    quantile: float
        The selection keeps the pixels of the positive map strictly above this quantile; in [0, 1].
    resize: bool
        Resize the relevance to the mask's size (bilinear, antialiased) instead of raising on a size mismatch.
    names: sequence of str, optional
        One name per image, used in error messages.

    Returns
    -------
    dict of str to torch.Tensor
        Float64 tensors shaped (N,): ``'iou'``, ``'precision'``, ``'recall'``, ``'f1'``, ``'pixel_accuracy'``,
        ``'pointing_game'`` (0 or 1), ``'mass_accuracy'``, ``'rank_accuracy'``, ``'threshold'`` (the quantile
        ``t`` of each positive map); boolean tensors shaped (N,): ``'empty_mask'``, ``'empty_selection'``,
        ``'no_positive'``. Undefined metrics are NaN.

    Raises
    ------
    MetricError
        For wrong shapes, different numbers of maps and masks, sizes that differ without ``resize``, NaN/inf values
        (naming the images), a quantile outside [0, 1].
    """
    positive, truth = _prepare(relevance, mask, resize, names)
    values, truth_from = _rank(positive, truth)
    quantiles = _check_quantiles(quantile, values.device)
    if len(quantiles) != 1:
        raise MetricError(f'evaluate_maps takes one quantile, got {quantile}; see iou_curve for several')
    selection, thresholds, empty_selection = _selection_scores(values, truth_from, quantiles)
    return {
        **{key: score[:, 0] for key, score in selection.items()},
        **_ranking_scores(positive, truth, values, truth_from),
        'threshold': thresholds[:, 0],
        'empty_mask': truth_from[:, 0] == 0,
        'empty_selection': empty_selection[:, 0],
        'no_positive': values[:, -1] == 0,
    }


def iou(relevance, mask, quantile=0.9, *, resize=False, names=None):
    """IoU of the selection and the ground truth, float64 (N,); the ``'iou'`` of :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, quantile, resize=resize, names=names)['iou']


def precision(relevance, mask, quantile=0.9, *, resize=False, names=None):
    """Share of the selection inside the ground truth, float64 (N,); the ``'precision'`` of :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, quantile, resize=resize, names=names)['precision']


def recall(relevance, mask, quantile=0.9, *, resize=False, names=None):
    """Share of the ground truth selected, float64 (N,); the ``'recall'`` of :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, quantile, resize=resize, names=names)['recall']


def f1(relevance, mask, quantile=0.9, *, resize=False, names=None):
    """Harmonic mean of precision and recall, float64 (N,); the ``'f1'`` of :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, quantile, resize=resize, names=names)['f1']


def pixel_accuracy(relevance, mask, quantile=0.9, *, resize=False, names=None):
    """Share of pixels the selection classifies right, float64 (N,); ``'pixel_accuracy'`` of :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, quantile, resize=resize, names=names)['pixel_accuracy']


def pointing_game(relevance, mask, *, resize=False, names=None):
    """1 where the positive map's maximum lies only inside the mask, else 0, float64 (N,); see :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, resize=resize, names=names)['pointing_game']


def mass_accuracy(relevance, mask, *, resize=False, names=None):
    """Share of the positive relevance inside the mask, float64 (N,); ``'mass_accuracy'`` of :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, resize=resize, names=names)['mass_accuracy']


def rank_accuracy(relevance, mask, *, resize=False, names=None):
    """Share of the ``|mask|`` most relevant pixels inside the mask, float64 (N,); see :func:`evaluate_maps`."""
    return evaluate_maps(relevance, mask, resize=resize, names=names)['rank_accuracy']


def iou_curve(relevance, mask, quantiles=None, *, resize=False, names=None):
    """IoU per image as a function of the selection quantile, and the normalised area under it.

    Parameters
    ----------
    relevance, mask, resize, names
        As for :func:`evaluate_maps`.
    quantiles: sequence of float or torch.Tensor, optional
        At least two increasing values in [0, 1]; default ``torch.linspace(0, 0.99, 100)``.

    Returns
    -------
    IoUCurve
        ``(quantiles (Q,), iou (N, Q), area (N,))``; ``area`` is the trapezoid integral over the quantile axis
        divided by ``quantiles[-1] - quantiles[0]``, so it lies in [0, 1]. Images with an empty mask are NaN.
    """
    positive, truth = _prepare(relevance, mask, resize, names)
    values, truth_from = _rank(positive, truth)
    if quantiles is None:
        quantiles = torch.linspace(0, 0.99, 100, dtype=torch.float64)
    quantiles = _check_quantiles(quantiles, values.device)
    if len(quantiles) < 2 or not (quantiles.diff() > 0).all():
        raise MetricError(f'iou_curve needs at least two increasing quantiles, got {quantiles.tolist()}')
    curve = _selection_scores(values, truth_from, quantiles)[0]['iou']
    area = torch.trapezoid(curve, quantiles, dim=1) / (quantiles[-1] - quantiles[0])
    return IoUCurve(quantiles, curve, area)


def _describe(values, confidence, n_boot, seed):
    """Mean, sample standard deviation and percentile bootstrap interval of the non-NaN ``values`` (1-D, CPU)."""
    kept = values[~values.isnan()]
    count = len(kept)
    summary = {
        'mean': kept.mean().item() if count else math.nan,
        'std': kept.std().item() if count > 1 else math.nan,
        'ci_low': math.nan,
        'ci_high': math.nan,
        'n': count,
        'excluded': len(values) - count,
    }
    if count:
        generator = torch.Generator().manual_seed(seed)
        resampled_means = kept[torch.randint(count, (n_boot, count), generator=generator)].mean(1)
        tails = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
        summary['ci_low'], summary['ci_high'] = torch.quantile(resampled_means, tails).tolist()
    return summary


def summarize(values, classes=None, class_names=None, confidence=0.95, n_boot=1000, seed=0):
    """Mean, standard deviation and bootstrap confidence interval of a per-image metric, overall and per class.

    NaN values (undefined metrics, see the module's docstring) are excluded from every statistic and counted in
    ``'excluded'``. The standard deviation is the sample one (divisor ``n - 1``; NaN for ``n < 2``). The interval is
    the percentile bootstrap of the mean: ``n_boot`` resamples with replacement drawn by a ``torch.Generator``
    seeded with ``seed`` (afresh for the overall summary and for each class, so a class's interval does not depend
    on the others), and the ``(1 ± confidence) / 2`` quantiles of their means.

    Parameters
    ----------
    values: torch.Tensor or array
        One value per image, shaped (N,).
    classes: torch.Tensor or array of int, optional
        The class index of each image, shaped (N,).
    class_names: sequence of str, optional
        Names of the class indices; with it, every named class gets an entry (also one without images) keyed by its
        name, otherwise the classes present get one keyed by index.
    confidence: float
        In (0, 1).
    n_boot: int
        Number of bootstrap resamples, at least 1.
    seed: int
        Seed of the bootstrap.

    Returns
    -------
    dict
        ``{'overall': stats, 'per_class': {class: stats}}`` (``'per_class'`` only with ``classes``), each ``stats``
        a dict of ``'mean'``, ``'std'``, ``'ci_low'``, ``'ci_high'`` (floats, NaN where no value is left) and ``'n'``,
        ``'excluded'`` (ints).

    Raises
    ------
    MetricError
        For infinite values, a wrong shape, classes outside ``class_names``, bad ``confidence`` or ``n_boot``.
    """
    values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if values.ndim != 1:
        raise MetricError(f'values must be shaped (N,), got {tuple(values.shape)}')
    if values.isinf().any():
        raise MetricError(f'values of image {_image_labels(values.isinf().nonzero().flatten().tolist(), None)} are '
                          'infinite')
    if not 0 < confidence < 1:
        raise MetricError(f'confidence must lie in (0, 1), got {confidence}')
    if int(n_boot) != n_boot or n_boot < 1:
        raise MetricError(f'n_boot must be a positive integer, got {n_boot}')
    summary = {'overall': _describe(values, confidence, int(n_boot), seed)}
    if classes is None:
        return summary

    classes = torch.as_tensor(classes).detach().cpu()
    if classes.shape != values.shape or classes.is_floating_point():
        raise MetricError(f'classes must be integers shaped {tuple(values.shape)}, got {classes.dtype} '
                          f'{tuple(classes.shape)}')
    if class_names is None:
        keys = {int(index): int(index) for index in classes.unique()}
    else:
        outside = classes[(classes < 0) | (classes >= len(class_names))].unique().tolist()
        if outside:
            raise MetricError(f'class indices {outside} have no name among {list(class_names)}')
        keys = dict(enumerate(class_names))
    summary['per_class'] = {
        key: _describe(values[classes == index], confidence, int(n_boot), seed) for index, key in keys.items()
    }
    return summary
