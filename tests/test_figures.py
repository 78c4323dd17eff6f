"""Tests of lrp_brain.figures: valid PNG files, symmetric relevance colours, the best sweep cell where asked."""
import matplotlib.image
import numpy as np
import pytest
import torch

from lrp_brain.figures import (FigureError, confusion_matrix_figure, four_panel, per_class_figure, select_images,
                               sweep_heatmap)

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
CLASS_NAMES = ['meningioma', 'glioma', 'pituitary']


def read_png(path):
    """Check ``path`` is a PNG file and return its pixels, (height, width, RGBA) floats in [0, 1]."""
    with open(path, 'rb') as stream:
        assert stream.read(8) == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4) and min(pixels.shape[:2]) > 100
    return pixels[..., :3]


def fraction_of_colour(pixels, colour, tolerance=0.06):
    """The fraction of pixels within ``tolerance`` of the RGB ``colour`` in every channel."""
    return np.all(np.abs(pixels - np.asarray(colour)) < tolerance, axis=-1).mean()


RED, BLUE, HALF_BLUE = (1., 0., 0.), (0., 0., 1.), (.5, .5, 1.)


def phantom(size=32):
    y, x = np.mgrid[:size, :size]
    mask = ((x - 10) ** 2 + (y - 12) ** 2 < 25).astype(float)
    image = np.clip(0.3 + 0.6 * mask + 0.05 * np.sin(x), 0, 1)
    return image, mask


def test_four_panel_writes_a_png_with_the_relevance_centred_at_zero(tmp_path):
    image, mask = phantom()
    # a constant positive map is pure red on a scale -m .. m (a scale from its own minimum would paint it blue)
    path = four_panel(tmp_path / 'positive.png', torch.tensor(image).expand(3, -1, -1), mask, np.full((3, 32, 32), 2.),
                      mask, 0.75, title='a title')
    assert path == tmp_path / 'positive.png'
    pixels = read_png(path)
    assert pixels.shape[1] > 2.5 * pixels.shape[0]
    assert fraction_of_colour(pixels, RED) > 0.08 and fraction_of_colour(pixels, BLUE) < 0.01
    negative = read_png(four_panel(tmp_path / 'negative.png', image, mask, np.full((32, 32), -2.), mask, float('nan')))
    assert fraction_of_colour(negative, BLUE) > 0.08 and fraction_of_colour(negative, RED) < 0.01


def test_four_panel_accepts_an_all_zero_map_and_rejects_mismatched_shapes(tmp_path):
    image, mask = phantom()
    read_png(four_panel(tmp_path / 'zero.png', image, mask, np.zeros((32, 32)), np.zeros((32, 32)), 0.))
    with pytest.raises(FigureError, match=r'relevance has shape \(16, 16\), but image has \(32, 32\)'):
        four_panel(tmp_path / 'bad.png', image, mask, np.zeros((16, 16)), mask, 0.5)
    with pytest.raises(FigureError, match='image must be'):
        four_panel(tmp_path / 'bad.png', np.zeros(32), mask, mask, mask, 0.5)


def test_per_class_figure_shares_one_symmetric_scale(tmp_path):
    image, mask = phantom()
    # class maps 1, -0.5 and 0 on a shared scale -1 .. 1: one pure red panel, one half blue, one white
    relevances = torch.tensor([1., -0.5, 0.])[:, None, None, None].expand(3, 3, 32, 32) / 3
    path = per_class_figure(tmp_path / 'classes.png', image, relevances, CLASS_NAMES, probabilities=[0.7, 0.2, 0.1],
                            mask=mask, title='slice')
    pixels = read_png(path)
    assert pixels.shape[1] > 3 * pixels.shape[0]
    assert fraction_of_colour(pixels, RED) > 0.08
    assert fraction_of_colour(pixels, HALF_BLUE) > 0.08 and fraction_of_colour(pixels, BLUE) < 0.01


def test_per_class_figure_checks_its_arguments(tmp_path):
    image, _ = phantom()
    with pytest.raises(FigureError, match='2 class_names for 3 relevance maps'):
        per_class_figure(tmp_path / 'x.png', image, np.zeros((3, 32, 32)), CLASS_NAMES[:2])
    with pytest.raises(FigureError, match='2 probabilities for 3'):
        per_class_figure(tmp_path / 'x.png', image, np.zeros((3, 32, 32)), CLASS_NAMES, probabilities=[0.5, 0.5])
    assert list(tmp_path.iterdir()) == []


def red_frame_centre(pixels):
    """The centre (row, column) of the pure red pixels: the frame around the best cell."""
    rows, columns = np.nonzero(np.all(np.abs(pixels - RED) < 0.1, axis=-1))
    assert len(rows) > 20
    return (rows.min() + rows.max()) / 2, (columns.min() + columns.max()) / 2


def test_sweep_heatmap_frames_the_best_cell_where_asked(tmp_path):
    epsilons, gammas = [0., 0.1, 0.25], [0., 0.05, 0.1, 0.5]
    mean_iou = np.arange(12.).reshape(3, 4) / 20
    mean_iou[2, 3] = np.nan
    centres = {
        cell: red_frame_centre(read_png(sweep_heatmap(tmp_path / f'{cell}.png', epsilons, gammas, mean_iou, best=cell)))
        for cell in [(0, 0), (0, 3), (2, 0), (1, 2)]
    }
    (row_00, column_00), (_, column_03), (row_20, _) = centres[(0, 0)], centres[(0, 3)], centres[(2, 0)]
    # γ runs left to right, ε bottom to top: cell (1, 2) lies on the grid the corner cells span
    assert column_03 > column_00 and row_20 < row_00
    row_12, column_12 = centres[(1, 2)]
    assert abs(row_12 - (row_00 + row_20) / 2) < 3
    assert abs(column_12 - (column_00 + 2 * (column_03 - column_00) / 3)) < 3
    # by default the largest finite value, (2, 2), is framed
    default = red_frame_centre(read_png(sweep_heatmap(tmp_path / 'default.png', epsilons, gammas, mean_iou)))
    assert abs(default[0] - row_20) < 3 and abs(default[1] - column_12) < 3


def test_sweep_heatmap_checks_its_arguments(tmp_path):
    with pytest.raises(FigureError, match=r'\(2, 2\), got shape \(2, 3\)'):
        sweep_heatmap(tmp_path / 'x.png', [0, 1], [0, 1], np.zeros((2, 3)))
    with pytest.raises(FigureError, match='outside the 2×2 grid'):
        sweep_heatmap(tmp_path / 'x.png', [0, 1], [0, 1], np.zeros((2, 2)), best=(2, 0))
    with pytest.raises(FigureError, match='no finite value'):
        sweep_heatmap(tmp_path / 'x.png', [0, 1], [0, 1], np.full((2, 2), np.nan))


def test_confusion_matrix_figure(tmp_path):
    matrix = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    pixels = read_png(confusion_matrix_figure(tmp_path / 'sub' / 'cm.png', matrix, CLASS_NAMES, title='test split'))
    assert abs(pixels.shape[0] - pixels.shape[1]) < pixels.shape[1] / 2
    with pytest.raises(FigureError, match='square'):
        confusion_matrix_figure(tmp_path / 'x.png', np.zeros((2, 3)), CLASS_NAMES)
    with pytest.raises(FigureError, match='non-negative'):
        confusion_matrix_figure(tmp_path / 'x.png', -np.eye(3), CLASS_NAMES)


def test_writing_is_atomic_and_leaves_pyplot_alone(tmp_path):
    import matplotlib.pyplot as pyplot
    figures_before = pyplot.get_fignums()
    matrix = np.eye(3)
    confusion_matrix_figure(tmp_path / 'cm.png', matrix, CLASS_NAMES)
    confusion_matrix_figure(tmp_path / 'cm.png', 2 * matrix, CLASS_NAMES)
    assert sorted(path.name for path in tmp_path.iterdir()) == ['cm.png']
    with pytest.raises(FigureError, match="'xyz' is not one of the formats"):
        confusion_matrix_figure(tmp_path / 'cm.xyz', matrix, CLASS_NAMES)
    assert sorted(path.name for path in tmp_path.iterdir()) == ['cm.png']
    assert pyplot.get_fignums() == figures_before


def test_select_images():
    values = np.array([0.5, np.nan, 0.1, 0.9, 0.1, 0.7])
    assert select_images(values, k=3, mode='worst').tolist() == [2, 4, 0]
    assert select_images(torch.tensor(values), k=2, mode='best').tolist() == [3, 5]
    assert select_images(values, k=10).tolist() == [2, 4, 0, 5, 3]
    assert select_images([np.nan], k=1).tolist() == []
    with pytest.raises(FigureError, match="'worst' or 'best'"):
        select_images(values, mode='median')
