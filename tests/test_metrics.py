"""Localisation metrics against hand-worked cases and a plain NumPy reference written here."""
import itertools
import math

import numpy as np
import pytest
import torch

from lrp_brain import metrics
from lrp_brain.metrics import MetricError, evaluate_maps, iou_curve, relevance_mask, summarize

NAN = math.nan
METRICS = (
    'iou', 'precision', 'recall', 'f1', 'pixel_accuracy', 'pointing_game', 'mass_accuracy', 'rank_accuracy'
)

# Hand-worked cases. Each: relevance, mask, quantile, expected metrics and flags, worked out in the comments.
# Notation: P positive map, t threshold, S = {P > t}, G = {mask >= .5}, K = |G|.
DESCENDING_3X3 = [[9., 8., 7.], [6., 5., 4.], [3., 2., 1.]]
TOP_LEFT_L = [[1., 1., 0.], [1., 0., 0.], [0., 0., 0.]]

HAND_CASES = {
    # P = R, sorted 1..9; q = .5: virtual index .5 * 8 = 4 -> t = 5; S = {9, 8, 7, 6}, G = {9, 8, 6}
    # TP = 3 (9, 8, 6), FP = 1 (7), FN = 0, TN = 5
    # IoU 3/4, precision 3/4, recall 1, F1 6/7, accuracy 8/9; max inside 9 > max outside 7: hit
    # mass (9 + 8 + 6) / 45 = 23/45; rank: K = 3, top 3 = {9, 8, 7}, 2 inside: 2/3
    'distinct values': (
        DESCENDING_3X3, TOP_LEFT_L, .5,
        dict(iou=3 / 4, precision=3 / 4, recall=1., f1=6 / 7, pixel_accuracy=8 / 9, pointing_game=1.,
             mass_accuracy=23 / 45, rank_accuracy=2 / 3, threshold=5.),
        dict(empty_mask=False, empty_selection=False, no_positive=False),
    ),
    # P = 1..16 row-major; q = .9: virtual index .9 * 15 = 13.5 -> t = (14 + 15) / 2 = 14.5; S = {15, 16}
    # G = bottom-right 2x2 = {11, 12, 15, 16}: TP = 2, FP = 0, FN = 2, TN = 12
    # IoU 2/4, precision 1, recall 1/2, F1 4/6, accuracy 14/16; 16 inside: hit
    # mass (11 + 12 + 15 + 16) / 136 = 54/136; rank: K = 4, top 4 = {13, 14, 15, 16}, 2 inside: 1/2
    'interpolated threshold': (
        np.arange(1., 17.).reshape(4, 4).tolist(),
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], .9,
        dict(iou=.5, precision=1., recall=.5, f1=2 / 3, pixel_accuracy=14 / 16, pointing_game=1.,
             mass_accuracy=54 / 136, rank_accuracy=.5, threshold=14.5),
        dict(empty_mask=False, empty_selection=False, no_positive=False),
    ),
    # one image (N, C, H, W) of two channels: [[1, -2], [3, 0]] + [[1, 1], [-4, 2]] = [[2, -1], [-1, 2]]
    # -> P = [[2, 0], [0, 2]]
    # sorted 0, 0, 2, 2; q = .5: virtual index 1.5 -> t = 1; S = {(0, 0), (1, 1)}; G = {(0, 0)}
    # TP = 1, FP = 1, FN = 0, TN = 2: IoU 1/2, precision 1/2, recall 1, F1 2/3, accuracy 3/4
    # max inside 2 = max outside 2: a tie is a miss; mass 2/4
    # rank: K = 1, the highest value 2 is shared by 2 pixels, 1 of them inside, 1 place: 1 * 1/2 / 1 = 1/2
    'channels, negatives, tied maximum': (
        [[[[1., -2.], [3., 0.]], [[1., 1.], [-4., 2.]]]], [[1, 0], [0, 0]], .5,
        dict(iou=.5, precision=.5, recall=1., f1=2 / 3, pixel_accuracy=3 / 4, pointing_game=0.,
             mass_accuracy=.5, rank_accuracy=.5, threshold=1.),
        dict(empty_mask=False, empty_selection=False, no_positive=False),
    ),
    # all-equal map: t = .7 and nothing lies strictly above it: S empty; G = centre
    # TP = 0, FP = 0, FN = 1, TN = 8: IoU 0, precision 0/0 -> NaN, recall 0, F1 0, accuracy 8/9
    # tied maximum: miss; mass .7 / 6.3 = 1/9; rank: all 9 tied, 1 place, 1 inside: 1/9 (chance)
    'all-equal map': (
        np.full((3, 3), .7).tolist(), [[0, 0, 0], [0, 1, 0], [0, 0, 0]], .9,
        dict(iou=0., precision=NAN, recall=0., f1=0., pixel_accuracy=8 / 9, pointing_game=0.,
             mass_accuracy=1 / 9, rank_accuracy=1 / 9, threshold=.7),
        dict(empty_mask=False, empty_selection=True, no_positive=False),
    ),
    # many zeros: P has 14 zeros and 2 and 5; q = .8: virtual index .8 * 15 = 12 -> t = 0; S = {5, 2}, only the
    # positives (2 < (1 - .8) * 16 = 3.2 pixels); G = centre 2x2, holding 5, 2 and two zeros
    # TP = 2, FP = 0, FN = 2, TN = 12: IoU 1/2, precision 1, recall 1/2, F1 2/3, accuracy 14/16; 5 inside: hit
    # mass 7/7; rank: K = 4, above the 4th highest value (0): 5, 2 (both inside); 14 zeros tied for 2 places,
    # 2 of them inside: (2 + 2 * 2/14) / 4 = 4/7
    'many zeros': (
        [[0., 0., 0., 0.], [0., 5., -1., 0.], [0., 0., 2., 0.], [0., -3., 0., 0.]],
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], .8,
        dict(iou=.5, precision=1., recall=.5, f1=2 / 3, pixel_accuracy=14 / 16, pointing_game=1.,
             mass_accuracy=1., rank_accuracy=4 / 7, threshold=0.),
        dict(empty_mask=False, empty_selection=False, no_positive=False),
    ),
    # empty ground truth: every metric undefined
    'empty mask': (
        DESCENDING_3X3, np.zeros((3, 3)).tolist(), .5,
        dict(iou=NAN, precision=NAN, recall=NAN, f1=NAN, pixel_accuracy=NAN, pointing_game=NAN,
             mass_accuracy=NAN, rank_accuracy=NAN, threshold=5.),
        dict(empty_mask=True, empty_selection=False, no_positive=False),
    ),
    # no positive relevance: P = 0, t = 0, S empty; G = {(0, 0), (1, 1)}
    # TP = 0, FP = 0, FN = 2, TN = 7: IoU 0, precision NaN, recall 0, F1 0, accuracy 7/9; 0 = 0: miss
    # mass 0/0 -> NaN; rank: K = 2, all 9 tied for 2 places, 2 inside: 2 * 2/9 / 2 = 2/9
    'no positive relevance': (
        [[-1., -2., 0.], [-3., -1., -1.], [0., -5., -2.]], [[1, 0, 0], [0, 1, 0], [0, 0, 0]], .9,
        dict(iou=0., precision=NAN, recall=0., f1=0., pixel_accuracy=7 / 9, pointing_game=0.,
             mass_accuracy=NAN, rank_accuracy=2 / 9, threshold=0.),
        dict(empty_mask=False, empty_selection=True, no_positive=True),
    ),
    # soft mask binarised at .5: G = {(0, 0), (0, 1), (1, 0)} (0.5 counts, 0.49 does not): as 'distinct values'
    'soft mask': (
        DESCENDING_3X3, [[.9, .5, .2], [.6, .49, 0.], [0., 0., 0.]], .5,
        dict(iou=3 / 4, precision=3 / 4, recall=1., f1=6 / 7, pixel_accuracy=8 / 9, pointing_game=1.,
             mass_accuracy=23 / 45, rank_accuracy=2 / 3, threshold=5.),
        dict(empty_mask=False, empty_selection=False, no_positive=False),
    ),
    # mask covering the image: P = [[1, 2], [3, 4]], q = .5: virtual index 1.5 -> t = 2.5; S = {3, 4}, G = all
    # TP = 2, FP = 0, FN = 2, TN = 0: IoU 1/2, precision 1, recall 1/2, F1 2/3, accuracy 2/4
    # nothing outside (max -inf): hit; mass 1; rank: K = 4 = every pixel: 1
    'mask covers the image': (
        [[1., 2.], [3., 4.]], [[1, 1], [1, 1]], .5,
        dict(iou=.5, precision=1., recall=.5, f1=2 / 3, pixel_accuracy=.5, pointing_game=1.,
             mass_accuracy=1., rank_accuracy=1., threshold=2.5),
        dict(empty_mask=False, empty_selection=False, no_positive=False),
    ),
    # q = 0: t = min = 1, S = 2..9 (8 pixels), G = {9, 8, 6}: TP = 3, FP = 5, FN = 0, TN = 1
    # IoU 3/8, precision 3/8, recall 1, F1 6/11, accuracy 4/9
    'quantile 0': (
        DESCENDING_3X3, TOP_LEFT_L, 0.,
        dict(iou=3 / 8, precision=3 / 8, recall=1., f1=6 / 11, pixel_accuracy=4 / 9, pointing_game=1.,
             mass_accuracy=23 / 45, rank_accuracy=2 / 3, threshold=1.),
        dict(empty_mask=False, empty_selection=False, no_positive=False),
    ),
    # q = 1: t = max = 9, S empty: TP = 0, FP = 0, FN = 3, TN = 6
    # IoU 0, precision NaN, recall 0, F1 0, accuracy 6/9
    'quantile 1': (
        DESCENDING_3X3, TOP_LEFT_L, 1.,
        dict(iou=0., precision=NAN, recall=0., f1=0., pixel_accuracy=6 / 9, pointing_game=1.,
             mass_accuracy=23 / 45, rank_accuracy=2 / 3, threshold=9.),
        dict(empty_mask=False, empty_selection=True, no_positive=False),
    ),
}


def assert_values(actual, expected):
    """Compare a float64 tensor of one value per image with expected numbers, NaN equal to NaN."""
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize('name', HAND_CASES)
def test_hand_worked_case(name):
    relevance, mask, quantile, expected, flags = HAND_CASES[name]
    result = evaluate_maps(torch.tensor(relevance, dtype=torch.float64), torch.tensor(mask), quantile)
    for key, value in expected.items():
        assert_values(result[key], [value])
    for key, value in flags.items():
        assert result[key].tolist() == [value], key


@pytest.mark.parametrize('name', ['distinct values', 'all-equal map', 'empty mask', 'no positive relevance'])
def test_views_return_their_entry(name):
    relevance, mask, quantile, expected, _ = HAND_CASES[name]
    relevance, mask = torch.tensor(relevance, dtype=torch.float64), torch.tensor(mask)
    for key in ('iou', 'precision', 'recall', 'f1', 'pixel_accuracy'):
        assert_values(getattr(metrics, key)(relevance, mask, quantile), [expected[key]])
    for key in ('pointing_game', 'mass_accuracy', 'rank_accuracy'):
        assert_values(getattr(metrics, key)(relevance, mask), [expected[key]])


def test_batch_of_cases_matches_single_images():
    names = ['distinct values', 'all-equal map', 'empty mask', 'no positive relevance', 'soft mask']
    relevance = torch.tensor([HAND_CASES[name][0] for name in names])
    masks = torch.tensor([HAND_CASES[name][1] for name in names])
    # q = .9 throughout; the single-image results are the reference
    batched = evaluate_maps(relevance[:, None].expand(-1, 3, -1, -1) / 3, masks, .9)
    for index, name in enumerate(names):
        single = evaluate_maps(torch.tensor(HAND_CASES[name][0]), torch.tensor(HAND_CASES[name][1]), .9)
        for key, value in single.items():
            torch.testing.assert_close(batched[key][index:index + 1], value, equal_nan=True)


def test_boolean_mask_and_float32_relevance():
    relevance, mask, quantile, expected, _ = HAND_CASES['distinct values']
    result = evaluate_maps(torch.tensor(relevance, dtype=torch.float32), torch.tensor(mask, dtype=torch.bool),
                           quantile)
    for key in METRICS:
        assert_values(result[key], [expected[key]])


def test_shapes_nchw_nhw_hw_agree():
    generator = torch.Generator().manual_seed(1)
    relevance = torch.randn(3, 2, 5, 6, generator=generator)
    masks = (torch.rand(3, 5, 6, generator=generator) > .6).float()
    from_nchw = evaluate_maps(relevance, masks)
    from_nhw = evaluate_maps(relevance.sum(1), masks)
    for key in METRICS:
        assert from_nchw[key].shape == (3,)
        torch.testing.assert_close(from_nchw[key], from_nhw[key])
        from_hw = evaluate_maps(relevance[1].sum(0), masks[1])[key]
        assert from_hw.shape == (1,)
        torch.testing.assert_close(from_hw, from_nchw[key][1:2])
    # a (1, C, H, W) relevance with an (H, W) mask is a batch of one
    torch.testing.assert_close(metrics.iou(relevance[:1], masks[0]), from_nchw['iou'][:1])


def test_rank_accuracy_is_the_expectation_over_tie_breaking():
    # tied values inside and outside the mask: average the top-K hit rate over every order of the pixels,
    # sorted by value with ties broken by that order
    positive = np.array([[3., 1., 1.], [1., 0., 1.]])
    mask = np.array([[0, 1, 0], [1, 1, 0]])
    inside = mask.ravel().astype(bool)
    top_count = inside.sum()
    hit_rates = []
    for order in itertools.permutations(range(positive.size)):
        ranked = sorted(range(positive.size), key=lambda pixel: (-positive.ravel()[pixel], order[pixel]))
        hit_rates.append(inside[ranked[:top_count]].mean())
    # by hand: K = 3; 3 is outside; 4 pixels tie at 1, 2 of them inside, for 2 places: (0 + 2 * 2/4) / 3 = 1/3
    assert np.mean(hit_rates) == pytest.approx(1 / 3)
    assert_values(metrics.rank_accuracy(torch.tensor(positive), torch.tensor(mask)), [np.mean(hit_rates)])


def test_relevance_mask_tie_rule():
    # distinct values, q = .5: t = 5, strictly above it
    selected = relevance_mask(torch.tensor(DESCENDING_3X3), .5)
    assert selected.dtype == torch.bool and selected.shape == (1, 3, 3)
    assert selected[0].tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    # all equal: the threshold equals every value, nothing is strictly above it
    assert not relevance_mask(torch.full((2, 3, 4, 4), 2.), .9).any()
    # 95 % zeros (19 of 20), q = .9: t = 0, only the single positive pixel
    sparse = torch.zeros(4, 5)
    sparse[2, 3] = .1
    sparse[0, 0] = -4.
    assert relevance_mask(sparse, .9)[0].nonzero().tolist() == [[2, 3]]
    # the channel sum is thresholded, not the channels: +1 and -1 cancel
    channels = torch.zeros(2, 3, 3)
    channels[0, 0, 0], channels[1, 0, 0] = 1., -1.
    channels[0, 2, 2] = .5
    assert relevance_mask(channels[None], .5)[0].nonzero().tolist() == [[2, 2]]


def test_threshold_equals_numpy_quantile_bitwise():
    generator = torch.Generator().manual_seed(2)
    relevance = torch.randn(4, 7, 9, generator=generator, dtype=torch.float64)
    masks = torch.ones(4, 7, 9)
    for quantile in (0., .1, .33, .5, .9, .95, .99, 1.):
        thresholds = evaluate_maps(relevance, masks, quantile)['threshold'].numpy()
        expected = [np.quantile(np.maximum(image, 0), quantile) for image in relevance.numpy()]
        np.testing.assert_array_equal(thresholds, expected)


def reference_metrics(relevance, mask, quantile):
    """The metrics of one image, written plainly in NumPy: relevance (C, H, W), mask (H, W)."""
    positive = np.maximum(relevance.sum(0), 0)
    truth = mask >= .5
    selected = positive > np.quantile(positive, quantile)
    if not truth.any():
        return dict.fromkeys(METRICS, NAN)
    tp, fp = np.sum(selected & truth), np.sum(selected & ~truth)
    fn, tn = np.sum(~selected & truth), np.sum(~selected & ~truth)
    outside_max = positive[~truth].max() if (~truth).any() else -np.inf
    # rank: the K highest values; those tied with the K-th highest share the places left
    top_count = truth.sum()
    kth_value = np.sort(positive.ravel())[::-1][top_count - 1]
    above, tied = positive > kth_value, positive == kth_value
    rank = (np.sum(above & truth) + (top_count - above.sum()) * np.sum(tied & truth) / tied.sum()) / top_count
    return dict(
        iou=tp / (tp + fp + fn),
        precision=tp / (tp + fp) if tp + fp else NAN,
        recall=tp / (tp + fn),
        f1=2 * (tp / (tp + fp)) * (tp / (tp + fn)) / ((tp / (tp + fp)) + (tp / (tp + fn))) if tp else 0.,
        pixel_accuracy=(tp + tn) / positive.size,
        pointing_game=float(positive[truth].max() > outside_max),
        mass_accuracy=positive[truth].sum() / positive.sum() if positive.sum() else NAN,
        rank_accuracy=rank,
    )


@pytest.mark.parametrize('seed', range(4))
def test_random_maps_match_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    count, height, width = 24, 9, 11
    # continuous values, small integers (ties everywhere), mostly negative maps (many zeros in P)
    relevance = np.concatenate([
        rng.normal(size=(count // 3, 3, height, width)),
        rng.integers(-2, 4, size=(count // 3, 3, height, width)).astype(float),
        rng.normal(-1.5, 1., size=(count // 3, 3, height, width)),
    ])
    masks = (rng.random((count, height, width)) < rng.uniform(.02, 1., size=(count, 1, 1))).astype(float)
    masks[0] = 0.                         # empty mask
    masks[1] = 1.                         # mask covering the image
    relevance[2] = -np.abs(relevance[2])  # no positive relevance
    for quantile in (.5, .9, .95):
        result = evaluate_maps(torch.tensor(relevance), torch.tensor(masks), quantile)
        for key in METRICS:
            expected = [reference_metrics(image, mask, quantile)[key] for image, mask in zip(relevance, masks)]
            np.testing.assert_allclose(result[key].numpy(), expected, rtol=1e-12, atol=1e-12, err_msg=key)


def test_nan_and_inf_relevance_name_the_images():
    relevance = torch.rand(4, 3, 5, 5)
    relevance[1, 2, 3, 3] = math.nan
    relevance[3, 0, 0, 0] = math.inf
    masks = torch.ones(4, 5, 5)
    with pytest.raises(MetricError, match=r'relevance of image 1, 3 contains NaN or inf'):
        evaluate_maps(relevance, masks)
    with pytest.raises(MetricError, match=r"image 1 \('b.mat'\), 3 \('d.mat'\)"):
        evaluate_maps(relevance, masks, names=['a.mat', 'b.mat', 'c.mat', 'd.mat'])
    masks[2, 0, 0] = math.nan
    with pytest.raises(MetricError, match=r'mask of image 2 contains NaN'):
        evaluate_maps(relevance.nan_to_num(posinf=0.), masks)


def test_size_mismatch_is_an_error_unless_resized():
    # 8x8 relevance hot in its top-left quarter, 4x4 mask marking the top-left quarter
    relevance = torch.zeros(1, 3, 8, 8)
    relevance[:, :, :4, :4] = 1.
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :2] = 1.
    with pytest.raises(MetricError, match=r'relevance is \(8, 8\) pixels but the mask is \(4, 4\).*resize=True'):
        evaluate_maps(relevance, mask)
    # antialiased bilinear shrinking by 2 (triangle weights 1/8, 3/8, 3/8, 1/8 of the source rows, renormalised at
    # the border): rows and columns become [1, 7/8, 1/8, 0] * 3, so the quarter holds the top 4 of 16 pixels;
    # q = .75: virtual index 11.25 falls between 3 * 1/8 and 3 * 49/64, so S is the quarter
    result = evaluate_maps(relevance, mask, .75, resize=True)
    assert_values(result['iou'], [1.])
    # mass: the map is 3 a a^T with a = [1, 7/8, 1/8, 0]: (1 + 7/8)^2 / (sum a)^2 = (225/64) / 4
    assert_values(result['mass_accuracy'], [225 / 256])
    # equal sizes: resize changes nothing
    equal = evaluate_maps(relevance, torch.zeros(1, 8, 8) + (relevance[:, 0] > 0), .75, resize=True)
    assert_values(equal['iou'], [1.])


def test_invalid_inputs_are_errors():
    relevance, mask = torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4)
    with pytest.raises(MetricError, match=r'relevance must be shaped .* got \(4,\)'):
        evaluate_maps(torch.rand(4), mask)
    with pytest.raises(MetricError, match=r'mask must be shaped .* got \(1, 2, 4, 4\)'):
        evaluate_maps(relevance, torch.ones(1, 2, 4, 4))
    with pytest.raises(MetricError, match='2 relevance maps but 3 masks'):
        evaluate_maps(relevance, torch.ones(3, 4, 4))
    with pytest.raises(MetricError, match='1 names given for 2 relevance maps'):
        evaluate_maps(relevance, mask, names=['only.mat'])
    for quantile in (-.1, 1.5, NAN):
        with pytest.raises(MetricError, match='quantiles must lie in'):
            evaluate_maps(relevance, mask, quantile)
    with pytest.raises(MetricError, match='one quantile'):
        evaluate_maps(relevance, mask, [.5, .9])


def test_iou_curve_hand_worked():
    # P = 1..9, G = {9, 8, 6}; t = 1 + 8q
    # q = 0: t = 1, S = 2..9: IoU 3/8; q = .5: 3/4; q = 1: S empty: 0
    # area: (.5 * (3/8 + 3/4) / 2 + .5 * (3/4 + 0) / 2) / 1 = 15/32
    curve = iou_curve(torch.tensor(DESCENDING_3X3), torch.tensor(TOP_LEFT_L), [0., .5, 1.])
    assert_values(curve.quantiles, [0., .5, 1.])
    torch.testing.assert_close(curve.iou, torch.tensor([[3 / 8, 3 / 4, 0.]], dtype=torch.float64))
    assert_values(curve.area, [15 / 32])
    # over [.5, 1] only: (3/4 + 0) / 2 * .5 / .5 = 3/8
    assert_values(iou_curve(torch.tensor(DESCENDING_3X3), torch.tensor(TOP_LEFT_L), [.5, 1.]).area, [3 / 8])


def test_iou_curve_matches_evaluate_maps_and_marks_empty_masks():
    generator = torch.Generator().manual_seed(3)
    relevance = torch.randn(3, 3, 6, 6, generator=generator)
    masks = (torch.rand(3, 6, 6, generator=generator) > .5).float()
    masks[2] = 0.
    curve = iou_curve(relevance, masks)
    assert curve.quantiles.shape == (100,) and curve.iou.shape == (3, 100)
    assert curve.quantiles[0] == 0 and curve.quantiles[-1] == pytest.approx(.99)
    for column in (0, 40, 99):
        torch.testing.assert_close(curve.iou[:, column], metrics.iou(relevance, masks, curve.quantiles[column]),
                                   equal_nan=True)
    assert curve.area[2].isnan() and not curve.area[:2].isnan().any()
    assert ((curve.area[:2] >= 0) & (curve.area[:2] <= 1)).all()
    for quantiles in ([.5], [.5, .4], [.2, .2, .3]):
        with pytest.raises(MetricError, match='at least two increasing quantiles'):
            iou_curve(relevance, masks, quantiles)


def test_summarize_excludes_and_counts_nan():
    summary = summarize([1., 2., 3., 4., NAN])
    overall = summary['overall']
    assert set(summary) == {'overall'}
    assert overall['n'] == 4 and overall['excluded'] == 1
    assert overall['mean'] == pytest.approx(2.5)
    assert overall['std'] == pytest.approx(math.sqrt(5 / 3))  # squares of deviations 2.25 + .25 + .25 + 2.25 over 3
    assert 1. <= overall['ci_low'] <= 2.5 <= overall['ci_high'] <= 4.
    nothing = summarize([NAN, NAN])['overall']
    assert nothing['n'] == 0 and nothing['excluded'] == 2 and math.isnan(nothing['mean'])
    assert math.isnan(nothing['ci_low']) and math.isnan(nothing['ci_high'])
    single = summarize([.3])['overall']
    assert (single['mean'], single['ci_low'], single['ci_high']) == (.3, .3, .3) and math.isnan(single['std'])


def test_summarize_of_evaluated_maps_excludes_the_empty_mask():
    names = ['distinct values', 'empty mask', 'soft mask']
    result = evaluate_maps(torch.tensor([HAND_CASES[name][0] for name in names]),
                           torch.tensor([HAND_CASES[name][1] for name in names]), .5)
    overall = summarize(result['iou'])['overall']
    assert (overall['n'], overall['excluded'], overall['mean']) == (2, 1, .75)


def test_bootstrap_interval_is_seeded_and_sized_like_the_standard_error():
    values = torch.randn(400, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    first = summarize(values, n_boot=2000, seed=7)['overall']
    assert summarize(values, n_boot=2000, seed=7)['overall'] == first
    assert summarize(values, n_boot=2000, seed=8)['overall']['ci_low'] != first['ci_low']
    assert first['ci_low'] < first['mean'] < first['ci_high']
    # the 95 % interval of a mean spans about 2 * 1.96 standard errors
    standard_error = values.std().item() / math.sqrt(len(values))
    assert first['ci_high'] - first['ci_low'] == pytest.approx(2 * 1.96 * standard_error, rel=.15)
    half = summarize(values, confidence=.5, n_boot=2000, seed=7)['overall']
    # the 50 % interval spans about 2 * .674 standard errors
    assert half['ci_high'] - half['ci_low'] == pytest.approx(2 * .674 * standard_error, rel=.15)


def test_summarize_per_class():
    values = [.1, .2, NAN, .4, .5, .6, .9, .3, .7]
    classes = [0, 0, 1, 1, 2, 2, 2, 2, 2]
    names = ('meningioma', 'glioma', 'pituitary', 'other')
    per_class = summarize(values, classes, names)['per_class']
    assert list(per_class) == list(names)
    assert per_class['meningioma']['mean'] == pytest.approx(.15) and per_class['meningioma']['n'] == 2
    assert per_class['glioma']['mean'] == pytest.approx(.4)
    assert (per_class['glioma']['n'], per_class['glioma']['excluded']) == (1, 1)
    assert per_class['pituitary']['mean'] == pytest.approx(.6)  # (.5 + .6 + .9 + .3 + .7) / 5
    assert per_class['other']['n'] == 0 and math.isnan(per_class['other']['mean'])
    # each class's bootstrap starts afresh from the seed: its interval is that of its values alone
    assert per_class['pituitary'] == summarize([.5, .6, .9, .3, .7])['overall']
    assert per_class['pituitary']['ci_low'] < per_class['pituitary']['ci_high']
    # without names: the classes present, keyed by index
    assert list(summarize(values, torch.tensor(classes))['per_class']) == [0, 1, 2]


def test_summarize_rejects_bad_input():
    with pytest.raises(MetricError, match=r'values of image 1 are infinite'):
        summarize([.1, math.inf])
    with pytest.raises(MetricError, match=r'class indices \[3\] have no name'):
        summarize([.1, .2], [0, 3], ('a', 'b'))
    with pytest.raises(MetricError, match='classes must be integers'):
        summarize([.1, .2], [0.])
    with pytest.raises(MetricError, match='confidence'):
        summarize([.1, .2], confidence=1.)
    with pytest.raises(MetricError, match='n_boot'):
        summarize([.1, .2], n_boot=0)
