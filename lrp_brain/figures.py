"""Figures of the study as PNG files: the four-panel explanation figure, one map per class, the ε×γ sweep heatmap
and the confusion matrix.

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
        figure.suptitle(title)
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
        panel.set_title(f'{class_names[k]}{probability}')
    colourbar = figure.colorbar(heatmap, ax=list(axes[1:]), fraction=0.025, pad=0.02, label='relevance')
    colourbar.formatter.set_powerlimits((-2, 3))
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def sweep_heatmap(path, epsilons, gammas, mean_iou, best=None, title=None):
    """Write the mean IoU over the ε×γ grid as an annotated heatmap with the best cell framed.

    Parameters
    ----------
    path: str or pathlib.Path
        The file to write.
    epsilons, gammas: sequence of float
        The grid's ε values (rows, bottom to top) and γ values (columns, left to right).
    mean_iou: array
        ``(len(epsilons), len(gammas))``; NaN cells (not computed) are grey.
    best: tuple of int, optional
        ``(i, j)``, the cell to frame (``epsilons[i]``, ``gammas[j]``); by default the largest finite mean IoU.
    title: str, optional
        The plot title (default "mean IoU over the ε×γ grid").

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    epsilons, gammas = _array(epsilons).reshape(-1), _array(gammas).reshape(-1)
    mean_iou = _array(mean_iou)
    if mean_iou.shape != (len(epsilons), len(gammas)):
        raise FigureError(f'mean_iou must be (len(epsilons), len(gammas)) = {(len(epsilons), len(gammas))}, got '
                          f'shape {mean_iou.shape}')
    finite = np.isfinite(mean_iou)
    if best is None:
        if not finite.any():
            raise FigureError('mean_iou has no finite value to mark as the best')
        best = np.unravel_index(np.argmax(np.where(finite, mean_iou, -np.inf)), mean_iou.shape)
    row, column = (int(index) for index in best)
    if not (0 <= row < len(epsilons) and 0 <= column < len(gammas)):
        raise FigureError(f'best cell {tuple(best)} is outside the {len(epsilons)}×{len(gammas)} grid')

    figure = _new_figure(max(4.5, 0.75 * len(gammas) + 2.2), max(3.5, 0.5 * len(epsilons) + 1.6))
    axes = figure.subplots()
    lowest, highest = (mean_iou[finite].min(), mean_iou[finite].max()) if finite.any() else (0., 1.)
    cells = axes.imshow(np.ma.masked_invalid(mean_iou), cmap=colormaps['viridis'].with_extremes(bad='#c8c8c8'),
                        origin='lower', aspect='auto', vmin=lowest, vmax=highest if highest > lowest else lowest + 1e-9)
    figure.colorbar(cells, ax=axes, label='mean IoU')
    font_size = 8 if max(mean_iou.shape) <= 8 else 6
    middle = (lowest + highest) / 2
    for i, j in np.ndindex(mean_iou.shape):
        value = mean_iou[i, j]
        text, colour = ('n/a', 'black') if not np.isfinite(value) else \
            (f'{value:.3f}', 'black' if value > middle else 'white')
        axes.text(j, i, text, ha='center', va='center', fontsize=font_size, color=colour,
                  fontweight='bold' if (i, j) == (row, column) else 'normal')
    axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor='red', linewidth=2.5))
    axes.set_xticks(range(len(gammas)), [f'{value:g}' for value in gammas])
    axes.set_yticks(range(len(epsilons)), [f'{value:g}' for value in epsilons])
    axes.set_xlabel('γ', fontsize=13)
    axes.set_ylabel('ε', fontsize=13, rotation=0, labelpad=10)
    best_text = f'best: ε = {epsilons[row]:g}, γ = {gammas[column]:g}, mean IoU {mean_iou[row, column]:.3f}'
    axes.set_title(f'{title or "mean IoU over the ε×γ grid"}\n{best_text}', fontsize=10)
    return _save(figure, path)


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
    axes.set_xticks(range(len(matrix)), class_names, rotation=30, ha='right')
    axes.set_yticks(range(len(matrix)), class_names)
    axes.set_xlabel('predicted class')
    axes.set_ylabel('true class')
    accuracy = 'n/a' if total == 0 else f'{100 * np.trace(matrix) / total:.1f} %'
    axes.set_title(f'{title or "confusion matrix"}\naccuracy {accuracy}, n = {total:g}', fontsize=10)
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
