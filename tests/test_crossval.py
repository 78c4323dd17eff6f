"""Cross-validation of :class:`lrp_brain.composites.VGGComposite`, run through Zennit's own attributor, against the
independent reference LRP of ``reference_lrp.py`` (float64, relative error ``max|a - b| / max|b|``)."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient

from lrp_brain.composites import VGGComposite
from reference_lrp import (
    fold_batch_norms, randomize_biases_and_statistics, random_vgg, reference_lrp,
)

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

TOLERANCE = 1e-6
TARGETS = [0, 2]

#: ImageNet-style per-channel bounds (mean/std normalisation of [0, 1] input), to test tensor-valued low/high.
CHANNEL_MEAN = torch.tensor([.485, .456, .406], dtype=torch.float64).reshape(1, 3, 1, 1)
CHANNEL_STD = torch.tensor([.229, .224, .225], dtype=torch.float64).reshape(1, 3, 1, 1)
CHANNEL_BOUNDS = {'low': (0 - CHANNEL_MEAN) / CHANNEL_STD, 'high': (1 - CHANNEL_MEAN) / CHANNEL_STD}

SETTINGS = {
    'seed figure': {},
    'LRP-0 everywhere (eps=0, gamma=0)': {'epsilon': 0., 'gamma': 0.},
    'large (eps=100, gamma=100)': {'epsilon': 100., 'gamma': 100.},
    'eps=1, gamma=0.5': {'epsilon': 1., 'gamma': .5},
    'eps=0, gamma=2': {'epsilon': 0., 'gamma': 2.},
    'std epsilon, 2 epsilon linears': {'epsilon': .25, 'std_epsilon': True, 'epsilon_linears': 2},
    'std epsilon=0': {'epsilon': 0., 'std_epsilon': True},
    'one epsilon linear': {'epsilon_linears': 1},
    'epsilon from block 3': {'epsilon_from_block': 3},
    'zero bias': {'zero_bias': True, 'epsilon_linears': 1},
    'per-channel bounds': CHANNEL_BOUNDS,
}


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def bounded_input(batch, size, low=0., high=1., seed=1):
    """Uniform random input between the z^B bounds."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(batch, 3, size, size, generator=generator, dtype=torch.float64)
    return low + (torch.as_tensor(high) - low) * uniform


def composite_lrp(model, input, attr_output, **composite_kwargs):
    """Attribute with the composite the way a Zennit user does: the Gradient attributor and an output relevance. The
    z^B bounds are the reference's defaults, 0 and 1 (the composite's own default is each sample's box), unless
    given."""
    with Gradient(model, VGGComposite(**{'low': 0., 'high': 1., **composite_kwargs})) as attributor:
        output, relevance = attributor(input, attr_output)
    return output, relevance


def one_hot(targets, classes):
    return torch.eye(classes, dtype=torch.float64)[targets]


def reference_for(model, input, **reference_kwargs):
    """The reference logits and relevance for the targets ``TARGETS`` (the first ``len(input)``)."""
    return reference_lrp(model, input, attr_output=one_hot(TARGETS[:len(input)], 3), **reference_kwargs)


def assert_composite_matches(reference, model, input, **composite_kwargs):
    """Run the composite for the targets ``TARGETS`` and compare it with ``reference`` (logits, relevance)."""
    expected_output, expected = reference
    output, relevance = composite_lrp(model, input, one_hot(TARGETS[:len(input)], 3), **composite_kwargs)
    assert relative_error(output, expected_output) < 1e-12, 'the reference forward does not reproduce the model'
    assert expected.abs().max() > 0
    error = relative_error(relevance, expected)
    assert error <= TOLERANCE, f'relative error {error:.3g} > {TOLERANCE:g} for {composite_kwargs}'


@pytest.fixture(scope='module')
def small_vgg16():
    return random_vgg(input_size=32)


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('setting', SETTINGS)
def test_small_vgg16_matches_reference(small_vgg16, setting, fast):
    kwargs = SETTINGS[setting]
    input = bounded_input(2, 32, kwargs.get('low', 0.), kwargs.get('high', 1.))
    assert_composite_matches(reference_for(small_vgg16, input, **kwargs), small_vgg16, input, fast=fast, **kwargs)


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('avgpool, size', [
    (None, 48),  # 1×1 feature maps replicated to 7×7
    (None, 64),  # 2×2 feature maps spread over overlapping 7×7 windows
    (nn.AdaptiveAvgPool2d((1, 1)), 64),  # 2×2 averaged to 1×1
    (nn.AvgPool2d(2), 64),
], ids=['adaptive7-48px', 'adaptive7-64px', 'adaptive1-64px', 'avgpool2-64px'])
@pytest.mark.parametrize('setting', ['seed figure', 'std epsilon, 2 epsilon linears', 'per-channel bounds'])
def test_average_pools_and_sizes_match_reference(avgpool, size, setting, fast):
    model = random_vgg(avgpool=avgpool, input_size=size, seed=size)
    kwargs = SETTINGS[setting]
    input = bounded_input(2, size, kwargs.get('low', 0.), kwargs.get('high', 1.))
    assert_composite_matches(reference_for(model, input, **kwargs), model, input, fast=fast, **kwargs)


@pytest.fixture(scope='module')
def torchvision_vgg16():
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None, num_classes=3)
    return randomize_biases_and_statistics(model, torch.Generator().manual_seed(0)).double().eval()


@pytest.fixture(scope='module')
def torchvision_vgg16_reference(torchvision_vgg16):
    """The reference for torchvision's VGG16 by ``(setting, batch, size)``, computed once for both rule sets."""
    cache = {}

    def reference(setting, batch, size):
        if (setting, batch, size) not in cache:
            input = bounded_input(batch, size)
            cache[setting, batch, size] = input, reference_for(torchvision_vgg16, input, **SETTINGS[setting])
        return cache[setting, batch, size]
    return reference


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('setting, batch, size', [
    ('seed figure', 2, 32),  # 1×1 feature maps replicated to 7×7
    ('std epsilon, 2 epsilon linears', 1, 64),  # 2×2 feature maps spread over 7×7
])
def test_torchvision_vgg16_matches_reference(torchvision_vgg16, torchvision_vgg16_reference, setting, batch, size,
                                             fast):
    input, reference = torchvision_vgg16_reference(setting, batch, size)
    assert_composite_matches(reference, torchvision_vgg16, input, fast=fast, **SETTINGS[setting])


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('setting', ['seed figure', 'eps=1, gamma=0.5', 'zero bias'])
def test_batch_norm_vgg_matches_reference_on_folded_copy(setting, fast):
    """A vgg16_bn-style network: the composite's canonizers merge the BatchNorms, which must give the LRP of the
    same network with the BatchNorms folded by hand; afterwards the model's parameters must be the original ones."""
    model = random_vgg(batch_norm=True, seed=3)
    folded = fold_batch_norms(model)
    input = bounded_input(2, 32)
    assert relative_error(folded(input), model(input)) < 1e-12, 'the test folding is wrong'
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert_composite_matches(reference_for(folded, input, **SETTINGS[setting]), model, input, fast=fast,
                             **SETTINGS[setting])
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items()), \
        'the canonizer did not restore the BatchNorm model'


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('epsilon, gamma', [(0., 0.), (1e-9, .5)])
def test_conservation_without_biases(small_vgg16, epsilon, gamma, fast):
    """With zero biases and ε ≈ 0 every rule (z^B, γ, LRP-0, Pass, Norm, winner takes all) conserves relevance: fed
    ``one_hot · logit``, the input relevance of each sample sums to its target logit.

    The only leak is the stabilisers' 1e-6 (relative ~1e-5 at this network's activations of ~0.3); the first
    convolution's weights are scaled by 1000, which scales every activation (the network is positively homogeneous
    without biases), so that the leak falls below the tolerance and anything else would show.
    """
    model = copy.deepcopy(small_vgg16)
    for module in model.modules():
        if getattr(module, 'bias', None) is not None:
            nn.init.zeros_(module.bias)
    model.features[0].weight.data *= 1000.
    input = bounded_input(2, 32)
    logits = model(input).detach()
    attr_output = one_hot(TARGETS, 3) * logits
    target_logits = logits[range(2), TARGETS]
    assert target_logits.abs().min() > 1e-3
    kwargs = {'epsilon': epsilon, 'gamma': gamma}
    _, expected = reference_lrp(model, input, attr_output=attr_output, **kwargs)
    _, relevance = composite_lrp(model, input, attr_output, fast=fast, **kwargs)
    for name, attribution in [('reference', expected), ('composite', relevance)]:
        sums = attribution.sum(dim=(1, 2, 3))
        error = ((sums - target_logits).abs() / target_logits.abs()).max().item()
        assert error <= TOLERANCE, f'{name}: relevance sums {sums.tolist()} != logits {target_logits.tolist()}'


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('wrong_mapping', [
    {'epsilon_from_block': 3},  # block 3 gets ε instead of γ
    {'epsilon_from_block': 6},  # γ also on blocks 4 and 5
    {'epsilon': .1, 'gamma': .25},  # ε and γ swapped
    {'low': -1.},  # wrong z^B bounds
    {'epsilon_linears': 1},  # ε instead of LRP-0 on fc1
], ids=['eps-from-3', 'gamma-everywhere', 'swapped-values', 'wrong-low', 'eps-on-fc1'])
def test_a_wrong_mapping_is_caught(small_vgg16, wrong_mapping, fast):
    """The cross-validation has teeth: the reference with a wrong mapping differs clearly from the composite."""
    input = bounded_input(2, 32)
    attr_output = one_hot(TARGETS, 3)
    _, relevance = composite_lrp(small_vgg16, input, attr_output, fast=fast)
    _, wrong = reference_lrp(small_vgg16, input, attr_output=attr_output, **wrong_mapping)
    assert relative_error(relevance, wrong) > 1e-3
