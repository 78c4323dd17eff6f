"""Region perturbation against answers known without it: closed forms of a linear model, a NumPy restatement of the
procedure one image and one step at a time, scipy's Gaussian filter, and the statistics of random maps."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from lrp_brain.data import Transform
from lrp_brain.explain import explain
from lrp_brain.faithfulness import (
    FaithfulnessError, forwards_per_map, gaussian_blur, inpaint, morf_lerf, region_perturbation, replaced_counts,
)
from lrp_brain.model import build_model, load_demo_model
from lrp_brain.phantom import make_slice

pytestmark = pytest.mark.usefixtures('single_threaded')


class LinearModel(nn.Module):
    """``f_k(x) = Σ w_k ⊙ x`` for ``K`` classes; records every batch it is given."""
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.batches = []

    def forward(self, images):
        self.batches.append(images.clone())
        return (images[:, None] * self.weight).sum((2, 3, 4))


def integers(shape, low, high, seed):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed)).double()


def linear_case(height=12, width=12, count=3, seed=0):
    """Integer weights and images: every sum below is exact in float64."""
    weight = integers((2, 3, height, width), -9, 10, seed)
    images = integers((count, 3, height, width), 0, 8, seed + 1)
    return LinearModel(weight), images


def patch_table(values, patch_size):
    """Sum an ``(H, W)`` array over each patch by slicing (the partial ones at the bottom / right included); the
    sums in row-major order."""
    height, width = values.shape
    return np.array([values[top:top + patch_size, left:left + patch_size].sum()
                     for top in range(0, height, patch_size) for left in range(0, width, patch_size)])


def counts_of(steps, schedule, regions_per_step):
    return [k * regions_per_step if schedule == 'constant' else k * k for k in range(steps + 1)]


@pytest.mark.parametrize('order', ['morf', 'lerf'])
@pytest.mark.parametrize('schedule, regions_per_step, steps', [('constant', 1, 7), ('constant', 2, 4),
                                                               ('squares', 1, 3)])
@pytest.mark.parametrize('height, width, patch_size', [(12, 12, 4), (13, 10, 4), (11, 9, 3)])
def test_linear_model_curve_is_the_score_minus_the_cumulative_patch_sums(order, schedule, regions_per_step, steps,
                                                                         height, width, patch_size):
    model, images = linear_case(height, width)
    targets = torch.tensor([0, 1, 0])
    relevance = model.weight[targets] * images
    curves = region_perturbation(model, images, relevance, targets, patch_size=patch_size, steps=steps,
                                 regions_per_step=regions_per_step, schedule=schedule, order=order, baseline=0.)
    counts = counts_of(steps, schedule, regions_per_step)
    for index in range(len(images)):
        values = relevance[index].sum(0).numpy()
        sums = np.sort(patch_table(values, patch_size))
        sums = sums[::-1] if order == 'morf' else sums
        removed = np.concatenate([[0.], np.cumsum(sums)])[counts]
        expected = values.sum() - removed
        assert torch.equal(curves.scores[index], torch.from_numpy(expected))
        auc = sum((expected[k - 1] + expected[k]) / 2 for k in range(1, steps + 1)) / steps / abs(expected[0])
        assert curves.auc[index].item() == pytest.approx(auc, rel=1e-12)
    assert curves.replaced.tolist() == counts
    assert curves.patch_count == math.ceil(height / patch_size) * math.ceil(width / patch_size)


@pytest.mark.parametrize('baseline', [2.5, 'mean'])
def test_linear_model_curve_with_a_baseline_drops_by_the_weighted_difference(baseline):
    model, images = linear_case(10, 14)
    targets = torch.tensor([1, 1, 0])
    relevance = model.weight[targets] * images
    steps, patch_size = 6, 4
    curves = region_perturbation(model, images, relevance, targets, patch_size=patch_size, steps=steps,
                                 baseline=baseline)
    for index in range(len(images)):
        image, weight = images[index].numpy(), model.weight[targets[index]].numpy()
        fill = np.full((3, 1, 1), baseline) if baseline == 2.5 else image.mean((1, 2), keepdims=True)
        order = np.argsort(-patch_table((weight * image).sum(0), patch_size), kind='stable')
        drops = patch_table((weight * (image - fill)).sum(0), patch_size)[order]
        expected = (weight * image).sum() - np.concatenate([[0.], np.cumsum(drops)])[:steps + 1]
        np.testing.assert_allclose(curves.scores[index].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_probability_score_is_the_softmax_of_the_closed_form_logits():
    model, images = linear_case()
    images = images / 8  # moderate logits
    targets = torch.tensor([0, 1, 1])
    relevance = model.weight[targets] * images
    curves = region_perturbation(model, images, relevance, targets, patch_size=4, steps=5, baseline=0.,
                                 score='probability')
    logits = region_perturbation(model, images, relevance, 0, patch_size=4, steps=5, baseline=0.).scores
    others = region_perturbation(model, images, relevance, 1, patch_size=4, steps=5, baseline=0.).scores
    stacked = torch.stack([logits, others])  # the same order for either target: it follows the relevance only
    expected = stacked.softmax(0)[targets, torch.arange(3)]
    torch.testing.assert_close(curves.scores, expected, rtol=1e-12, atol=1e-12)


def numpy_curve(model, image, relevance, target, patch_size, counts, score):
    """The procedure restated: one image, one step, one forward pass at a time, in NumPy."""
    _, height, width = image.shape
    sums = patch_table(relevance.sum(0), patch_size)
    order = np.argsort(-sums, kind='stable')
    columns = -(-width // patch_size)
    fill = image.mean((1, 2), keepdims=True)
    curve = []
    for count in counts:
        perturbed = image.copy()
        for patch in order[:count]:
            top, left = patch // columns * patch_size, patch % columns * patch_size
            perturbed[:, top:top + patch_size, left:left + patch_size] = \
                fill.repeat(patch_size, 1).repeat(patch_size, 2)[:, :height - top, :width - left][
                    :, :patch_size, :patch_size]
        with torch.no_grad():
            output = model(torch.from_numpy(perturbed)[None])[0].numpy()
        value = output[target]
        if score == 'probability':
            value = np.exp(output[target] - output.max()) / np.exp(output - output.max()).sum()
        curve.append(value)
    return np.array(curve)


def tiny_vgg(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = build_model('vgg16', num_classes=3, width=4).to(dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.normal_(0., 0.05)
    return model


@pytest.mark.parametrize('score', ['logit', 'probability'])
def test_tiny_vgg_curves_match_a_numpy_restatement(score):
    model = tiny_vgg()
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, 40, 36, generator=generator, dtype=torch.float64)
    relevance = torch.randn(2, 3, 3, 40, 36, generator=generator, dtype=torch.float64)
    targets = torch.tensor([2, 0, 1])
    steps, patch_size = 6, 8
    curves = region_perturbation(model, images, relevance, targets, patch_size=patch_size, steps=steps, score=score)
    assert curves.scores.shape == (2, 3, steps + 1)
    for setting in range(2):
        for index in range(3):
            expected = numpy_curve(model, images[index].numpy(), relevance[setting, index].numpy(),
                                   targets[index].item(), patch_size, range(steps + 1), score)
            np.testing.assert_allclose(curves.scores[setting, index].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_ties_are_broken_by_row_major_position():
    model, images = linear_case(10, 10, count=2)
    targets = torch.tensor([0, 0])
    # constant positive relevance: the 4 full 4×4 patches tie (16 each), the partial ones have 8 or 4
    constant = torch.ones(2, 3, 10, 10, dtype=torch.float64)
    morf = region_perturbation(model, images, constant, targets, patch_size=4, steps=9, baseline=0.)
    lerf = region_perturbation(model, images, constant, targets, patch_size=4, steps=9, baseline=0., order='lerf')
    # row-major patch indices of the 3×3 grid: 0 1 | 2 / 3 4 | 5 / 6 7 | 8 (2, 5, 6, 7 partial, 8 the corner)
    for curves, order in [(morf, [0, 1, 3, 4, 2, 5, 6, 7, 8]), (lerf, [8, 2, 5, 6, 7, 0, 1, 3, 4])]:
        for index in range(2):
            contributions = patch_table((model.weight[0] * images[index]).sum(0).numpy(), 4)[order]
            expected = contributions.sum() - np.concatenate([[0.], np.cumsum(contributions)])
            assert torch.equal(curves.scores[index], torch.from_numpy(expected))


def test_all_zero_relevance_gives_equal_curves_and_no_gap():
    model, images = linear_case(9, 9)
    zeros = torch.zeros_like(images)
    result = morf_lerf(model, images, zeros, 0, patch_size=3, steps=9)
    assert torch.equal(result.morf.scores, result.lerf.scores)
    assert torch.equal(result.gap, torch.zeros(3, dtype=torch.float64))
    assert result.morf.scores[:, -1].isfinite().all()


def test_random_order_is_a_seeded_permutation_shared_by_the_maps():
    model, images = linear_case(8, 8, count=2)
    relevance = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64)
    first = region_perturbation(model, images, relevance, 0, patch_size=2, steps=16, order='random', seed=5,
                                baseline=0.)
    again = region_perturbation(model, images, relevance, 0, patch_size=2, steps=16, order='random', seed=5,
                                baseline=0.)
    other = region_perturbation(model, images, relevance, 0, patch_size=2, steps=16, order='random', seed=6,
                                baseline=0.)
    assert torch.equal(first.scores, again.scores)
    assert not torch.equal(first.scores, other.scores)
    assert torch.equal(first.scores[0], first.scores[1])  # the order does not look at the map
    # the copies: each step replaces exactly one more 2×2 patch, and never restores one
    model.batches.clear()
    region_perturbation(model, images, relevance[0], 0, patch_size=2, steps=16, order='random', baseline=-1.)
    copies = torch.cat(model.batches)[2:].reshape(2, 16, 3, 8, 8)
    replaced = (copies == -1).all(2)
    assert (replaced.flatten(2).sum(2) == 4 * torch.arange(1, 17)).all()
    assert (replaced[:, 1:] >= replaced[:, :-1]).all()


def test_all_steps_run_in_two_stacked_forward_passes_or_in_batches():
    model, images = linear_case(8, 8)
    relevance = torch.randn(4, 3, 3, 8, 8, dtype=torch.float64)
    result = morf_lerf(model, images, relevance, 1, patch_size=2, steps=5)
    sizes = [len(batch) for batch in model.batches]
    assert sizes == [3, 2 * 4 * 3 * 5]  # the unperturbed images, then every copy stacked
    model.batches.clear()
    chunked = morf_lerf(model, images, relevance, 1, patch_size=2, steps=5, batch_size=7)
    assert [len(batch) for batch in model.batches] == [7] * 17 + [4]  # 3 + 120 copies
    torch.testing.assert_close(chunked.gap, result.gap, rtol=1e-12, atol=1e-12)
    assert forwards_per_map(steps=5, maps=4) == (1 + 2 * 5 * 4) / 4
    assert forwards_per_map() == 33


def test_several_maps_and_both_orders_equal_single_calls():
    model = tiny_vgg(seed=1)
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    relevance = torch.randn(3, 2, 3, 32, 32, generator=generator, dtype=torch.float64)
    both = morf_lerf(model, images, relevance, [0, 2], patch_size=8, steps=5, baseline='blur')
    for setting in range(3):
        for order, curves in [('morf', both.morf), ('lerf', both.lerf)]:
            single = region_perturbation(model, images, relevance[setting], [0, 2], patch_size=8, steps=5,
                                         baseline='blur', order=order, batch_size=1)
            torch.testing.assert_close(curves.scores[setting], single.scores, rtol=1e-10, atol=1e-12)
            assert curves.settings['order'] == order
    torch.testing.assert_close(both.gap, both.lerf.auc - both.morf.auc)
    assert both.columns().keys() == {'morf_auc', 'lerf_auc', 'faithfulness_gap'}


def recorded_copies(baseline, seed=0, patch_size=4, steps=5, image=None):
    """The perturbed copies a baseline makes of one image (MoRF by a random map) and the mask of each."""
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 16, 16, generator=generator, dtype=torch.float64) if image is None else image
    relevance = torch.randn(image.shape, generator=generator, dtype=torch.float64)
    copies = {}
    for fill in (baseline, -7.):  # the images lie in [0, 1]: -7 marks the replaced pixels of the same order
        model = LinearModel(torch.zeros(1, *image.shape[1:], dtype=torch.float64))
        region_perturbation(model, image, relevance, 0, patch_size=patch_size, steps=steps, baseline=fill, seed=seed)
        copies[fill] = torch.cat(model.batches)[1:]
    return image[0], copies[baseline], (copies[-7.] == -7.).all(1)


@pytest.mark.parametrize('baseline', ['uniform', 'blur', 'inpaint', 0.3, 'mean'])
def test_baselines_leave_every_other_pixel_unchanged(baseline):
    image, copies, masks = recorded_copies(baseline)
    assert masks.any()
    kept = ~masks[:, None].expand_as(copies)
    assert torch.equal(copies[kept], image.expand_as(copies)[kept])
    changed = masks[:, None].expand_as(copies)
    assert not torch.equal(copies[changed], image.expand_as(copies)[changed])


def test_uniform_noise_is_seeded_within_the_image_range_and_kept_across_steps():
    image, copies, masks = recorded_copies('uniform', seed=1)
    _, same, _ = recorded_copies('uniform', seed=1)
    _, other, _ = recorded_copies('uniform', seed=2)
    assert torch.equal(copies, same) and not torch.equal(copies, other)
    noise = copies[-1]
    inside = masks[-1].expand_as(noise)
    assert (noise[inside] >= image.min()).all() and (noise[inside] <= image.max()).all()
    for step in range(len(copies) - 1):  # a pixel replaced at one step keeps its noise value afterwards
        earlier = masks[step].expand_as(noise)
        assert torch.equal(copies[step][earlier], noise[earlier])


def test_blur_baseline_is_scipy_gaussian_filter():
    image, copies, masks = recorded_copies('blur', patch_size=4)
    expected = np.stack([scipy.ndimage.gaussian_filter(channel, sigma=2., mode='nearest', truncate=4.)
                         for channel in image.numpy()])
    inside = masks[-1].expand_as(image)
    np.testing.assert_allclose(copies[-1][inside].numpy(), expected[inside.numpy()], rtol=1e-12, atol=1e-12)
    tiny = torch.rand(1, 2, 3, 3, dtype=torch.float64)  # a kernel far wider than the image
    np.testing.assert_allclose(gaussian_blur(tiny, 3.)[0].numpy(), np.stack([
        scipy.ndimage.gaussian_filter(channel, sigma=3., mode='nearest', truncate=4.) for channel in tiny[0].numpy()
    ]), rtol=1e-12, atol=1e-12)


def test_inpaint_continues_the_surroundings():
    rows, columns = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing='ij')
    ramp = ((0.3 * columns + 0.7 * rows) / 31).double().expand(1, 3, 32, 32)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 8:16, 12:20] = True
    filled = inpaint(ramp, mask, relaxation_steps=16)
    # a linear ramp is harmonic: the fill comes back to it, where a constant fill (the mean) misses by its slope
    assert (filled - ramp).abs().max() < 0.01
    assert (ramp.mean() - ramp)[mask[:, None].expand_as(ramp)].abs().max() > 0.2
    constant = torch.full((2, 1, 8, 8), 0.4, dtype=torch.float64)
    holes = torch.zeros(2, 8, 8, dtype=torch.bool)
    holes[0, 2:6, 2:6] = True
    holes[1] = True  # nothing left to fill from: the image's mean
    assert torch.equal(inpaint(constant, holes, 4), constant)
    image, copies, masks = recorded_copies('inpaint', patch_size=4)
    for copy, mask in zip(copies, masks):
        for channel in range(3):
            known = image[channel][~mask]
            assert known.min() <= copy[channel][mask].min() and copy[channel][mask].max() <= known.max()


def test_nan_relevance_is_refused_naming_the_image_before_any_forward():
    model, images = linear_case()
    relevance = torch.ones(2, *images.shape, dtype=torch.float64)
    relevance[1, 2, 0, 3, 3] = math.nan
    with pytest.raises(FaithfulnessError, match=r"image 2 \('c.mat'\), in map 1 of 2 for image 2, contains NaN"):
        morf_lerf(model, images, relevance, 0, patch_size=4, steps=3, names=['a.mat', 'b.mat', 'c.mat'])
    with pytest.raises(FaithfulnessError, match=r'relevance of image 2 contains NaN'):
        region_perturbation(model, images, relevance[1], 0, patch_size=4, steps=3)
    assert model.batches == []


@pytest.mark.parametrize('options, message', [
    ({'patch_size': 0}, 'patch_size must be an integer >= 1'),
    ({'patch_size': 2.0}, 'patch_size must be an integer'),
    ({'steps': 0}, 'steps must be an integer >= 1'),
    ({'steps': 10, 'patch_size': 4}, r'replace 10 patches, but a 12×12 image has 9 patches'),
    ({'schedule': 'squares', 'steps': 4, 'patch_size': 4}, r'replace 16 patches'),
    ({'schedule': 'squares', 'regions_per_step': 2}, "regions_per_step applies to schedule='constant' only"),
    ({'schedule': 'linear'}, 'schedule must be one of'),
    ({'order': 'best'}, 'order must be one of'),
    ({'baseline': 'zero'}, 'baseline must be a finite number or one of'),
    ({'baseline': math.nan}, 'baseline must be a finite number'),
    ({'baseline': True}, 'baseline must be a finite number'),
    ({'score': 'loss'}, 'score must be one of'),
    ({'seed': 1.5}, 'seed must be an integer'),
    ({'batch_size': 0}, 'batch_size must be an integer >= 1'),
    ({'targets': [0, 1]}, r'one class index per image \(3\)'),
    ({'targets': 0.5}, 'integer class indices'),
    ({'relevance': torch.ones(3, 3, 12, 11)}, 'does not fit the images'),
    ({'relevance': torch.ones(12, 12)}, r'relevance must be a tensor \(N, C, H, W\)'),
    ({'images': torch.ones(3, 12, 12)}, r'images must be a floating-point tensor \(N, C, H, W\)'),
    ({'names': ['a']}, '1 names given for 3 images'),
])
def test_invalid_arguments_are_refused_before_any_forward(options, message):
    model, images = linear_case()
    arguments = {'images': images, 'relevance': torch.ones_like(images), 'targets': 0, 'patch_size': 2, 'steps': 3,
                 **options}
    with pytest.raises(FaithfulnessError, match=message):
        region_perturbation(model, arguments.pop('images'), arguments.pop('relevance'), arguments.pop('targets'),
                            **arguments)
    assert model.batches == []


def test_bad_images_and_targets_outside_the_model_are_refused():
    model, images = linear_case()
    broken = images.clone()
    broken[1, 0, 0, 0] = math.inf
    with pytest.raises(FaithfulnessError, match=r"image 1 \('b'\) contains NaN or inf"):
        region_perturbation(model, broken, images, 0, patch_size=4, steps=2, names=['a', 'b', 'c'])
    with pytest.raises(FaithfulnessError, match='target of image 1 is class 2, but the model has 2 classes'):
        region_perturbation(model, images, images, [0, 2, 1], patch_size=4, steps=2)
    assert [len(batch) for batch in model.batches] == [3]  # the unperturbed pass only


def test_model_modes_are_restored_and_dropout_is_off():
    model = tiny_vgg(seed=3).train()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    relevance = torch.randn_like(images)
    trained = region_perturbation(model, images, relevance, 1, patch_size=8, steps=4)
    assert model.training and all(module.training for module in model.modules())
    evaluated = region_perturbation(model.eval(), images, relevance, 1, patch_size=8, steps=4)
    assert torch.equal(trained.scores, evaluated.scores)


def test_replaced_counts_follow_the_schedules():
    assert replaced_counts(4).tolist() == [0, 1, 2, 3, 4]
    assert replaced_counts(3, regions_per_step=5).tolist() == [0, 5, 10, 15]
    assert replaced_counts(4, 'squares').tolist() == [0, 1, 4, 9, 16]


def phantom_batch(count, seed=0):
    rng = np.random.default_rng(seed)
    transform = Transform(size=64)
    images = torch.stack([transform(make_slice(rng, index % 3, 128)[0])[0] for index in range(count)])
    return images, torch.arange(count) % 3


@pytest.mark.zennit_both
def test_random_maps_give_no_gap_and_lrp_maps_a_clear_one():
    """On the demo model and 24 phantoms, MoRF and LeRF of a random map are the same procedure (two random orders)
    so the mean gap is 0 up to noise: it must lie within 3 standard errors of 0 (measured with 8 steps: −0.010,
    SE 0.050). LRP's maps must beat chance by more than 3 standard errors (measured: 0.60, SE 0.075)."""
    model, _ = load_demo_model()
    images, labels = phantom_batch(24)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    lrp = explain(model, images, 'label', labels).relevance
    random_gap, lrp_gap = morf_lerf(model, images, torch.stack([noise, lrp]), labels, steps=8, score='probability').gap
    assert abs(random_gap.mean()) <= 3 * random_gap.std() / math.sqrt(len(random_gap))
    assert lrp_gap.mean() - 3 * lrp_gap.std() / math.sqrt(len(lrp_gap)) > 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_gives_the_cpu_curves():
    model = tiny_vgg(seed=2)
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    relevance = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    for baseline in ['uniform', 'inpaint']:
        cpu = morf_lerf(model, images, relevance, [0, 1, 2], patch_size=4, steps=8, baseline=baseline)
        cuda = morf_lerf(model.cuda(), images.cuda(), relevance.cuda(), [0, 1, 2], patch_size=4, steps=8,
                         baseline=baseline)
        model.cpu()
        assert cuda.morf.scores.device.type == 'cuda'
        torch.testing.assert_close(cuda.gap.cpu(), cpu.gap, rtol=1e-9, atol=1e-12)
