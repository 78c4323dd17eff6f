"""Extreme ε and γ — 0, 1e-12 and 1e6, all nine pairs, with and without ``std_epsilon`` — on a small VGG16 at 32 px:
the relevance of the composite (fast and Zennit rules), of :func:`~lrp_brain.explain.explain` and of the sweep engine
equals the float64 reference of ``tests/reference_lrp.py``, or, where the reference itself is not finite, a clear
error names the image. Invalid ε and γ name the parameter, and no NaN reaches a metric silently.

The inputs are random images in [0, 1] and an all-zero one; the networks have zero biases (as built), random biases,
or ReLUs that never fire (half of a γ layer's and an ε layer's channels, or a whole layer).
"""
import itertools
import math
import re
from functools import partial

import pytest
import torch
from zennit.attribution import Gradient

from lrp_brain.composites import VGGComposite
from lrp_brain.explain import ExplainError, explain
from lrp_brain.metrics import MetricError, evaluate_maps
from lrp_brain.model import vgg16_small
from lrp_brain.sweep_engine import SweepEngine, SweepError
from reference_lrp import randomize_biases_and_statistics, reference_lrp

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

EXTREMES = (0., 1e-12, 1e6)
#: The image of the batch that is all zero.
ZERO_IMAGE = 1
TARGETS = torch.tensor([0, 1, 2])
#: vgg16_small(width=4): ``features.7`` is a convolution of block 2 (LRP-γ), ``features.10`` one of block 3 (γ),
#: ``features.17`` one of block 4 (LRP-ε).
DEAD_BIAS = -1e3


def network(biases='random'):
    """A float64 vgg16_small(width=4) in evaluation mode: ``biases`` ``'zero'`` (as built), ``'random'``, or random
    with ReLUs that never fire: ``'half dead'`` (half the channels of features.7 and features.17) or ``'dead layer'``
    (all of features.10)."""
    torch.manual_seed(0)
    model = vgg16_small(width=4).double().eval()
    if biases == 'zero':
        return model
    randomize_biases_and_statistics(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        if biases == 'half dead':
            model.features[7].bias[:4] = DEAD_BIAS
            model.features[17].bias[:16] = DEAD_BIAS
        elif biases == 'dead layer':
            model.features[10].bias[:] = DEAD_BIAS
    return model


def batch():
    """Random images in [0, 1], the one at :data:`ZERO_IMAGE` all zero, float64 (3, 3, 32, 32)."""
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    images[ZERO_IMAGE] = 0
    return images


def expected_finite(biases, std_epsilon):
    """Which images have a finite relevance: all, but for ε·std(z) on zero biases the zero image, whose layer outputs
    are all zero (std 0, so the denominator is 0 + 0)."""
    return [not (std_epsilon and biases == 'zero' and index == ZERO_IMAGE) for index in range(len(TARGETS))]


def composite_relevance(model, images, **composite_options):
    """The relevance of :class:`VGGComposite` through Zennit's ``Gradient``, one-hot at :data:`TARGETS`, with the
    reference's z^B bounds 0 and 1 unless given."""
    output_relevance = torch.eye(3, dtype=images.dtype)[TARGETS]
    with Gradient(model, VGGComposite(**{'low': 0., 'high': 1., **composite_options})) as attributor:
        _, relevance = attributor(images.clone().requires_grad_(True), output_relevance)
    return relevance


def assert_matches_reference(relevance, reference, finite):
    """``relevance`` is finite on the images ``finite`` flags, not elsewhere, and equals ``reference`` there."""
    assert torch.isfinite(relevance).flatten(1).all(1).tolist() == finite
    scale = reference[finite].abs().max()
    torch.testing.assert_close(relevance[finite], reference[finite], rtol=1e-7, atol=1e-9 * scale.item())


BIASES = ('zero', 'random', 'half dead', 'dead layer')


@pytest.mark.parametrize('std_epsilon', [False, True])
@pytest.mark.parametrize('epsilon, gamma', itertools.product(EXTREMES, EXTREMES))
@pytest.mark.parametrize('biases', BIASES)
def test_extreme_settings_match_the_reference_or_fail_clearly(biases, epsilon, gamma, std_epsilon):
    model, images = network(biases), batch()
    settings = dict(epsilon=epsilon, gamma=gamma, std_epsilon=std_epsilon)
    _, reference = reference_lrp(model, images, TARGETS, **settings)
    finite = expected_finite(biases, std_epsilon)
    assert torch.isfinite(reference).flatten(1).all(1).tolist() == finite
    if biases == 'dead layer':  # no relevance passes a layer whose ReLUs never fire
        assert not reference.any()
    for fast in (True, False):
        assert_matches_reference(composite_relevance(model, images, fast=fast, **settings), reference, finite)

    run = partial(explain, model, images, TARGETS, epsilon=epsilon, gamma=gamma,
                  composite_kwargs={'std_epsilon': std_epsilon})
    if all(finite):
        assert_matches_reference(run().relevance, reference, finite)
    else:
        with pytest.raises(ExplainError, match='^' + re.escape(
            f'the lrp relevance of image {ZERO_IMAGE} is NaN or infinite with epsilon={epsilon:g}, gamma={gamma:g}, '
            f'std_epsilon=True; std_epsilon=True scales ε by the standard deviation'
        )):
            run()


@pytest.mark.parametrize('std_epsilon', [False, True])
@pytest.mark.parametrize('biases', BIASES)
def test_sweep_engine_at_extreme_settings(biases, std_epsilon):
    """The sweep gives the reference where it is finite; where it is not, the metrics refuse the map, naming it."""
    model, images = network(biases), batch()
    grid = SweepEngine(model, EXTREMES, EXTREMES, 0., 1., std_epsilon=std_epsilon).relevance(images, TARGETS)
    finite = expected_finite(biases, std_epsilon)
    masks = torch.zeros(3, 32, 32)
    masks[:, 8:20, 8:20] = 1
    for (eps_index, epsilon), (gamma_index, gamma) in itertools.product(enumerate(EXTREMES), enumerate(EXTREMES)):
        _, reference = reference_lrp(model, images, TARGETS, epsilon=epsilon, gamma=gamma, std_epsilon=std_epsilon)
        assert_matches_reference(grid[eps_index, gamma_index], reference, finite)
        if not all(finite):
            with pytest.raises(MetricError, match=rf"relevance of image {ZERO_IMAGE} \('zero.mat'\) contains NaN"):
                evaluate_maps(grid[eps_index, gamma_index], masks, names=['a.mat', 'zero.mat', 'b.mat'])


@pytest.mark.parametrize('name, value', [
    ('epsilon', -1e-12), ('epsilon', math.nan), ('epsilon', math.inf), ('epsilon', -math.inf),
    ('gamma', -1.), ('gamma', math.nan), ('gamma', math.inf),
])
def test_negative_or_non_finite_parameters_name_the_parameter(name, value):
    model, images = network(), batch()
    message = rf'{name} must be (>= 0|finite), got {value}'
    with pytest.raises(ValueError, match=f'^{message}'):
        VGGComposite(**{name: value})
    with pytest.raises(ValueError, match=f'^{message}'):
        explain(model, images, TARGETS, **{name: value})
    with pytest.raises(SweepError, match=re.escape(f'{name}s[1] = {value:g}: ') + message):
        SweepEngine(model, **{'epsilons': [.25], 'gammas': [.25], f'{name}s': [.25, value]})


def overflowing(model):
    """``model`` with the largest float32 for every weight of its first convolution: any non-zero input overflows
    to inf (and then NaN), a zero one gives 0."""
    with torch.no_grad():
        model.features[0].weight.fill_(torch.finfo(torch.float32).max)
    return model


def nan_weight(model):
    """``model`` with one NaN weight in its first convolution: every output is NaN (even 0 · NaN is NaN)."""
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = math.nan
    return model


@pytest.mark.parametrize('break_model, explain_names, metric_names', [
    (nan_weight, r'image 0 \(images with them: \[0, 1\]\)', r"image 0 \('a'\), 1 \('b'\), 2 \('c'\)"),
    # the zero images 0 and 1 give 0, not inf: the first batch passes
    (overflowing, 'image 2', r"image 2 \('c'\)"),
])
@pytest.mark.parametrize('method', ['lrp', 'gradient'])
def test_broken_model_never_gives_nan_to_the_metrics(break_model, explain_names, metric_names, method):
    """explain refuses non-finite results, naming the image (by its index in the whole input, not the batch); the
    metrics refuse NaN relevance computed elsewhere, naming the image."""
    model = break_model(vgg16_small(width=4).float().eval())
    images = batch().float()
    images[0] = 0
    with pytest.raises(ExplainError, match=f'^the model output of {explain_names} is NaN or infinite'):
        explain(model, images, TARGETS, method=method, batch_size=2)

    relevance = composite_relevance(model, images)
    with pytest.raises(MetricError, match=f'^relevance of {metric_names} contains NaN or inf values'):
        evaluate_maps(relevance, torch.ones(3, 32, 32), names=['a', 'b', 'c'])
