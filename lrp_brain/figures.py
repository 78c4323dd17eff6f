"""Figures of the study as PNG files: the four-panel explanation figure, one map per class, the ε×γ sweep heatmaps,
the confusion matrix and the randomisation test.

Arrays or tensors in, a file out. Only this module uses matplotlib, and only through :class:`matplotlib.figure.Figure`
with the Agg canvas: no pyplot, no global figure registry, no change of the caller's backend. Each file is written to
a temporary name next to its target and then renamed, so a reader never sees half a PNG.

Relevance is drawn with a diverging colour map centred at 0 (red positive, blue negative, white zero) between
``-m`` and ``m``, ``m`` the largest absolute relevance; maps of several channels are summed over the channels first,
as in the study.
"""
import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from lrp_brain.outputs import atomic_write_bytes

#: The colour map of relevance: diverging, white at 0.
RELEVANCE_CMAP = 'bwr'
#: The colour of the tumour outline drawn over images and maps.
MASK_COLOUR = '#ffb000'
#: The colour of the outline on the (white) relevance heatmap, where amber would be hard to see.
MASK_COLOUR_ON_WHITE = '#00a000'
#: Resolution of the written files.
DPI = 150


class FigureError(ValueError):
    """An argument of a figure function with the wrong shape or value."""


def _array(values):
    """Return ``values`` (numpy array, tensor or sequence) as a float numpy array."""
    if hasattr(values, 'detach'):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float)


def _plane(values, name, reduce):
    """Return an ``(H, W)`` map of ``values`` given as ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``.

    ``reduce`` combines the channels: ``np.mean`` for an image (its channels are copies), ``np.sum`` for relevance.
    """
    array = original = _array(values)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        array = reduce(array, axis=0)
    if array.ndim != 2:
        raise FigureError(f'{name} must be (H, W) or (C, H, W), got shape {original.shape}')
    return array


def _same_shape(reference_name, reference, **others):
    for name, array in others.items():
        if array is not None and array.shape != reference.shape:
            raise FigureError(f'{name} has shape {array.shape}, but {reference_name} has {reference.shape}')


def _symmetric_limit(relevance):
    """Return ``m`` for a colour scale ``-m .. m`` that holds all of ``relevance`` (1 for an all-zero map)."""
    finite = np.abs(relevance[np.isfinite(relevance)])
    limit = finite.max() if finite.size else 0.
    return float(limit) if limit > 0 else 1.


def _drawable(text):
    """``text`` (a title, a class name) as matplotlib draws it unchanged: a file name that is not valid UTF-8 (whose
    bytes :func:`os.fsdecode` turned into lone surrogates, which matplotlib refuses) shows them as ``\\xff``, other
    lone surrogates as ``\\udXXX``, and ``$`` is escaped, so that a name like ``a$_$b.png`` is not parsed as maths."""
    text = str(text)
    try:
        text = text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    except UnicodeEncodeError:  # a surrogate that no undecodable byte gave
        text = text.encode('utf-8', 'backslashreplace').decode('utf-8')
    return text.replace('$', r'\$')


def _new_figure(width, height):
    figure = Figure(figsize=(width, height), layout='constrained')
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    """Write ``figure`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    file_format = path.suffix.lstrip('.').lower() or 'png'
    supported = figure.canvas.get_supported_filetypes()
    if file_format not in supported:
        raise FigureError(f'cannot write {path}: {file_format!r} is not one of the formats {sorted(supported)}')
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format=file_format, dpi=DPI)
    finally:
        figure.clear()
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _show_image(axes, image):
    axes.imshow(image, cmap='gray', interpolation='nearest')
    axes.set_axis_off()


def _outline(axes, mask, colour):
    """Draw the outline of the binary ``mask`` (the 0.5 level) on ``axes``, if the mask has any foreground."""
    if mask is not None and (mask > 0.5).any() and not (mask > 0.5).all():
        axes.contour(mask, levels=[0.5], colors=[colour], linewidths=1.2)


def _show_relevance(axes, relevance, limit):
    axes.set_axis_off()
    return axes.imshow(relevance, cmap=RELEVANCE_CMAP, vmin=-limit, vmax=limit, interpolation='nearest')


def four_panel(path, image, mask, relevance, binary_mask, iou, title=None):
    """Write the study's four-panel figure for one image.

    Panels: (a) the image; (b) the tumour mask over the image; (c) the relevance heatmap on a symmetric colour scale
    with its colour bar and the tumour outline; (d) the binary relevance mask with the tumour outline and the IoU.

    Parameters
    ----------
    path: str or pathlib.Path
        The file to write (PNG unless the suffix names another format matplotlib writes).
    image: array or tensor
        ``(H, W)`` or ``(C, H, W)`` (channels averaged).
    mask: array or tensor
        ``(H, W)``, the tumour mask (foreground > 0.5).
    relevance: array or tensor
        ``(H, W)`` or ``(C, H, W)`` (summed over channels).
    binary_mask: array or tensor
        ``(H, W)``, the thresholded relevance (foreground > 0.5).
    iou: float
        The IoU of ``binary_mask`` with ``mask``; NaN (an empty union) is shown as "n/a".
    title: str, optional
        A title above the panels, e.g. the file, the true and the predicted class.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    image = _plane(image, 'image', np.mean)
    mask = _plane(mask, 'mask', np.mean)
    relevance = _plane(relevance, 'relevance', np.sum)
    binary_mask = _plane(binary_mask, 'binary_mask', np.mean)
    _same_shape('image', image, mask=mask, relevance=relevance, binary_mask=binary_mask)

    figure = _new_figure(13, 3.9)
    axes = figure.subplots(1, 4)
    _show_image(axes[0], image)
    axes[0].set_title('(a) image')

    _show_image(axes[1], image)
    axes[1].imshow(np.ma.masked_where(mask <= 0.5, mask), cmap='autumn', alpha=0.45, vmin=0, vmax=1,
                   interpolation='nearest')
    _outline(axes[1], mask, MASK_COLOUR)
    axes[1].set_title('(b) tumour mask')

    limit = _symmetric_limit(relevance)
    heatmap = _show_relevance(axes[2], relevance, limit)
    _outline(axes[2], mask, MASK_COLOUR_ON_WHITE)
    axes[2].set_title('(c) relevance')
    colourbar = figure.colorbar(heatmap, ax=axes[2], fraction=0.046, pad=0.02)
    colourbar.ax.tick_params(labelsize=8)
    colourbar.formatter.set_powerlimits((-2, 3))

    axes[3].imshow(binary_mask > 0.5, cmap='gray', vmin=0, vmax=1, interpolation='nearest')
    axes[3].set_axis_off()
    _outline(axes[3], mask, MASK_COLOUR)
    iou_text = 'n/a' if iou is None or not np.isfinite(iou) else f'{float(iou):.3f}'
    axes[3].set_title(f'(d) relevance mask, IoU = {iou_text}')
    axes[3].legend(handles=[Line2D([], [], color=MASK_COLOUR, label='tumour outline')], loc='lower right',
                   fontsize=8, framealpha=0.8)
    if title:
        figure.suptitle(_drawable(title))
    return _save(figure, path)


def per_class_figure(path, image, relevances, class_names, probabilities=None, mask=None, title=None):
    """Write one relevance map per class for the same image, on one shared symmetric colour scale.

    Parameters
    ----------
    path: str or pathlib.Path
        The file to write.
    image: array or tensor
        ``(H, W)`` or ``(C, H, W)``.
    relevances: array or tensor
        ``(K, H, W)`` or ``(K, C, H, W)`` (summed over channels), map ``k`` explaining class ``k``.
    class_names: sequence of str
        ``K`` names, for the titles.
    probabilities: sequence of float, optional
        ``K`` predicted probabilities, shown in the titles.
    mask: array or tensor, optional
        ``(H, W)`` tumour mask, outlined on the image and the maps.
    title: str, optional
        A title above the panels.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    image = _plane(image, 'image', np.mean)
    relevances = _array(relevances)
    if relevances.ndim == 4:
        relevances = relevances.sum(axis=1)
    if relevances.ndim != 3:
        raise FigureError(f'relevances must be (K, H, W) or (K, C, H, W), got shape {relevances.shape}')
    count = len(relevances)
    if len(class_names) != count:
        raise FigureError(f'{len(class_names)} class_names for {count} relevance maps')
    if probabilities is not None:
        probabilities = _array(probabilities).reshape(-1)
        if len(probabilities) != count:
            raise FigureError(f'{len(probabilities)} probabilities for {count} relevance maps')
    if mask is not None:
        mask = _plane(mask, 'mask', np.mean)
    _same_shape('image', image, mask=mask, **{'each relevance map': relevances[0]})

    figure = _new_figure(3.2 * (count + 1) + 0.8, 3.6)
    axes = figure.subplots(1, count + 1)
    _show_image(axes[0], image)
    _outline(axes[0], mask, MASK_COLOUR)
    axes[0].set_title('image')
    limit = _symmetric_limit(relevances)
    for k, (panel, relevance) in enumerate(zip(axes[1:], relevances)):
        heatmap = _show_relevance(panel, relevance, limit)
        _outline(panel, mask, MASK_COLOUR_ON_WHITE)
        probability = '' if probabilities is None else f'\np = {probabilities[k]:.3f}'
        panel.set_title(f'{_drawable(class_names[k])}{probability}')
    colourbar = figure.colorbar(heatmap, ax=list(axes[1:]), fraction=0.025, pad=0.02, label='relevance')
    colourbar.formatter.set_powerlimits((-2, 3))
    if title:
        figure.suptitle(_drawable(title))
    return _save(figure, path)


def contrast_figure(path, images, maps, class_names, masks=None, row_titles=None, title=None):
    """Write a grid comparing output relevances: one row per image, the image, then every variant's map of every
    class. Each (image, variant) group of maps shares one symmetric colour scale (contrastive maps have their own
    magnitudes).

    Parameters
    ----------
    path: str or pathlib.Path
        The file to write.
    images: array or tensor
        ``(N, H, W)`` or ``(N, C, H, W)``.
    maps: dict of str to array or tensor
        ``{variant name: (N, K, C, H, W) or (N, K, H, W)}``, map ``[n, k]`` explaining class ``k`` of image ``n``.
    class_names: sequence of str
        ``K`` names.
    masks: array or tensor, optional
        ``(N, H, W)`` tumour masks, outlined on the images and the maps.
    row_titles, title: optional
        One label per row (shown on the image), and a title above the grid.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    variants = {name: _array(values) for name, values in maps.items()}
    variants = {name: values.sum(axis=2) if values.ndim == 5 else values for name, values in variants.items()}
    count, classes = len(images), len(class_names)
    for name, values in variants.items():
        if values.ndim != 4 or values.shape[:2] != (count, classes):
            raise FigureError(f'maps[{name!r}] must be ({count}, {classes}, H, W) or with channels, got shape '
                              f'{values.shape}')
    columns = 1 + classes * len(variants)
    figure = _new_figure(1.9 * columns + 0.4, 2.1 * count + 0.6)
    axes = np.asarray(figure.subplots(count, columns, squeeze=False))
    for row in range(count):
        image = _plane(images[row], 'image', np.mean)
        mask = None if masks is None else _plane(masks[row], 'mask', np.mean)
        _show_image(axes[row, 0], image)
        _outline(axes[row, 0], mask, MASK_COLOUR)
        if row_titles is not None:
            axes[row, 0].set_title(_drawable(row_titles[row]), fontsize=9)
        for offset, (name, values) in enumerate(variants.items()):
            limit = _symmetric_limit(values[row])
            for k in range(classes):
                panel = axes[row, 1 + offset * classes + k]
                _show_relevance(panel, values[row, k], limit)
                _outline(panel, mask, MASK_COLOUR_ON_WHITE)
                if row == 0:
                    panel.set_title(f'{_drawable(name)}: {_drawable(class_names[k])}', fontsize=9)
    if title:
        figure.suptitle(_drawable(title))
    return _save(figure, path)


def sweep_heatmap(path, epsilons, gammas, values, best=None, title=None):
    """Write the mean of one criterion or several over the ε×γ grid as annotated heatmaps side by side, the chosen cell
    framed in each.

    Parameters
    ----------
    path: str or pathlib.Path
        The file to write.
    epsilons, gammas: sequence of float
        The grid's ε values (rows, bottom to top) and γ values (columns, left to right).
    values: array or dict
        ``(len(epsilons), len(gammas))`` means of the IoU, or ``{label: such an array}`` for one panel per criterion
        (e.g. ``'mean IoU'`` and ``'mean faithfulness gap'``); NaN cells (not computed) are grey.
    best: tuple of int, optional
        ``(i, j)``, the cell to frame (``epsilons[i]``, ``gammas[j]``); by default the largest finite value of the first
        panel.
    title: str, optional
        The figure title (default "mean IoU over the ε×γ grid").

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    epsilons, gammas = _array(epsilons).reshape(-1), _array(gammas).reshape(-1)
    panels = {label: _array(means) for label, means in (values.items() if isinstance(values, dict)
                                                         else [('mean IoU', values)])}
    for label, means in panels.items():
        if means.shape != (len(epsilons), len(gammas)):
            raise FigureError(f'{label} must be (len(epsilons), len(gammas)) = {(len(epsilons), len(gammas))}, got '
                              f'shape {means.shape}')
    first_label, first = next(iter(panels.items()))
    if best is None:
        if not np.isfinite(first).any():
            raise FigureError(f'{first_label} has no finite value to mark as the best')
        best = np.unravel_index(np.argmax(np.where(np.isfinite(first), first, -np.inf)), first.shape)
    row, column = (int(index) for index in best)
    if not (0 <= row < len(epsilons) and 0 <= column < len(gammas)):
        raise FigureError(f'best cell {tuple(best)} is outside the {len(epsilons)}×{len(gammas)} grid')

    figure = _new_figure(len(panels) * max(4.5, 0.75 * len(gammas) + 2.2), max(3.5, 0.5 * len(epsilons) + 1.6))
    for axes, (label, means) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels.items()):
        _heatmap_panel(figure, axes, epsilons, gammas, means, (row, column), label)
    figure.suptitle(_drawable(title or 'mean IoU over the ε×γ grid'), fontsize=10)
    return _save(figure, path)


def _heatmap_panel(figure, axes, epsilons, gammas, means, best, label):
    """One annotated heatmap of ``means`` with the cell ``best`` framed and its value in the panel's title."""
    row, column = best
    finite = np.isfinite(means)
    lowest, highest = (means[finite].min(), means[finite].max()) if finite.any() else (0., 1.)
    cells = axes.imshow(np.ma.masked_invalid(means), cmap=colormaps['viridis'].with_extremes(bad='#c8c8c8'),
                        origin='lower', aspect='auto', vmin=lowest, vmax=highest if highest > lowest else lowest + 1e-9)
    figure.colorbar(cells, ax=axes, label=_drawable(label))
    font_size = 8 if max(means.shape) <= 8 else 6
    middle = (lowest + highest) / 2
    for i, j in np.ndindex(means.shape):
        value = means[i, j]
        text, colour = ('n/a', 'black') if not np.isfinite(value) else \
            (f'{value:.3f}', 'black' if value > middle else 'white')
        axes.text(j, i, text, ha='center', va='center', fontsize=font_size, color=colour,
                  fontweight='bold' if (i, j) == (row, column) else 'normal')
    axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor='red', linewidth=2.5))
    axes.set_xticks(range(len(gammas)), [f'{value:g}' for value in gammas])
    axes.set_yticks(range(len(epsilons)), [f'{value:g}' for value in epsilons])
    axes.set_xlabel('γ', fontsize=13)
    axes.set_ylabel('ε', fontsize=13, rotation=0, labelpad=10)
    value = means[row, column]
    axes.set_title(f'{_drawable(label)}\nchosen: ε = {epsilons[row]:g}, γ = {gammas[column]:g}: '
                   + ('n/a' if not np.isfinite(value) else f'{value:.3f}'), fontsize=9)


def confusion_matrix_figure(path, matrix, class_names, title=None):
    """Write a confusion matrix with counts and row-normalised percentages (the recall of each true class).

    Parameters
    ----------
    path: str or pathlib.Path
        The file to write.
    matrix: array
        ``(K, K)`` counts; rows are the true classes, columns the predicted ones.
    class_names: sequence of str
        ``K`` names.
    title: str, optional
        The plot title (default "confusion matrix"); the accuracy and the number of images are added below it.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    matrix = _array(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise FigureError(f'matrix must be square (K, K), got shape {matrix.shape}')
    if len(class_names) != len(matrix):
        raise FigureError(f'{len(class_names)} class_names for a {len(matrix)}×{len(matrix)} matrix')
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise FigureError('matrix must hold non-negative finite counts')
    row_totals = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid='ignore', divide='ignore'):
        row_fractions = np.where(row_totals > 0, matrix / row_totals, np.nan)
    total = matrix.sum()

    size = max(4., 1.1 * len(matrix) + 2.2)
    figure = _new_figure(size + 1., size)
    axes = figure.subplots()
    cells = axes.imshow(np.ma.masked_invalid(row_fractions), cmap=colormaps['Blues'].with_extremes(bad='#e0e0e0'),
                        vmin=0, vmax=1)
    figure.colorbar(cells, ax=axes, label='fraction of the true class', fraction=0.046, pad=0.04)
    for i, j in np.ndindex(matrix.shape):
        fraction = row_fractions[i, j]
        percent = 'n/a' if not np.isfinite(fraction) else f'{100 * fraction:.1f} %'
        axes.text(j, i, f'{matrix[i, j]:g}\n{percent}', ha='center', va='center', fontsize=10,
                  color='white' if np.isfinite(fraction) and fraction > 0.5 else 'black')
    names = [_drawable(name) for name in class_names]
    axes.set_xticks(range(len(matrix)), names, rotation=30, ha='right')
    axes.set_yticks(range(len(matrix)), names)
    axes.set_xlabel('predicted class')
    axes.set_ylabel('true class')
    accuracy = 'n/a' if total == 0 else f'{100 * np.trace(matrix) / total:.1f} %'
    axes.set_title(f'{_drawable(title or "confusion matrix")}\naccuracy {accuracy}, n = {total:g}', fontsize=10)
    return _save(figure, path)


def select_images(values, k=3, mode='worst'):
    """Return the indices of the ``k`` smallest (``'worst'``) or largest (``'best'``) values, NaN ignored.

    Ties keep the lower index first. Fewer than ``k`` indices come back when fewer values are finite.

    Parameters
    ----------
    values: array or tensor
        ``(N,)``, e.g. the IoU of every image.
    k: int
        How many indices.
    mode: str
        ``'worst'`` (ascending) or ``'best'`` (descending).

    Returns
    -------
    numpy.ndarray
        Integer indices into ``values``, worst (or best) first.
    """
    if mode not in ('worst', 'best'):
        raise FigureError(f"mode must be 'worst' or 'best', got {mode!r}")
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise FigureError(f'k must be an integer >= 0, got {k!r}')
    values = _array(values).reshape(-1)
    finite = np.flatnonzero(np.isfinite(values))
    keys = values[finite] if mode == 'worst' else -values[finite]
    return finite[np.argsort(keys, kind='stable')[:int(k)]]


def randomisation_figure(path, stages, similarity, class_sensitivity=None, title=None):
    """Write the similarity of the maps to the original model's against the randomised depth, one line per method
    and one panel per similarity measure (the cascading randomisation test of :mod:`lrp_brain.sanity`).

    Parameters
    ----------
    path: str or pathlib.Path
        The file to write.
    stages: sequence of str
        ``'original'``, then the layer group randomised at each stage (the x axis, left to right).
    similarity: dict
        ``{method: {measure: [mean similarity per stage]}}`` (:meth:`lrp_brain.sanity.RandomisationResult.summary`);
        ``None`` or NaN values are not drawn.
    class_sensitivity: dict, optional
        ``{method: mean similarity of the maps of different classes}``, shown in the legend.
    title: str, optional

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    stages = [str(stage) for stage in stages]
    if not similarity:
        raise FigureError('similarity holds no method to draw')
    measures = list(next(iter(similarity.values())))
    figure = _new_figure(4. * len(measures) + 0.6, 3.8)
    panels = np.atleast_1d(figure.subplots(1, len(measures), sharey=True))
    for panel, measure in zip(panels, measures):
        for method, values in similarity.items():
            curve = np.array([np.nan if value is None else value for value in values[measure]], dtype=float)
            if len(curve) != len(stages):
                raise FigureError(f'{method} {measure}: {len(curve)} values for {len(stages)} stages')
            label = _drawable(method)
            if class_sensitivity is not None and class_sensitivity.get(method) is not None:
                label += f' (classes {class_sensitivity[method]:.2f})'
            panel.plot(range(len(stages)), curve, marker='o', label=label)
        panel.axhline(0., color='grey', linewidth=0.8)
        panel.set_xticks(range(len(stages)), [_drawable(stage) for stage in stages], rotation=45, ha='right')
        panel.set_xlabel('randomised down to')
        panel.set_title(_drawable(measure))
        panel.set_ylim(-1.05, 1.05)
    panels[0].set_ylabel('similarity to the original map')
    panels[-1].legend(fontsize=8, loc='lower left')
    if title:
        figure.suptitle(_drawable(title), fontsize=10)
    return _save(figure, path)
