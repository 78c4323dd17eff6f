"""The rule mapping of :class:`lrp_brain.composites.VGGComposite`, its parameter checks, the registry entry, the z^B
bounds (derived, checked against the input, or each sample's own), foreign classifier heads, layer groups found from
the forward order of any feed-forward network, and the clean-up after the composite's context (also when it fails)."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.fx
import torchvision
from torch import nn
from zennit import rules as zennit_rules
from zennit.attribution import Gradient
from zennit.composites import COMPOSITES, NameMapComposite

import lrp_brain
from lrp_brain import rules as fast_rules
from lrp_brain.canonizers import MergeBatchNormIntoPrevious
from lrp_brain.composites import (
    BOUNDS_TOLERANCE, IMAGENET_MEAN, IMAGENET_STD, STABILIZER, SampleBoundsZBox, VGGComposite, format_rule_table,
    rule_table, zbox_bounds,
)
from lrp_brain.data import Transform
from lrp_brain.explain import explain
from reference_lrp import fold_batch_norms, random_vgg, reference_lrp

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

#: Convolutions per block of torchvision's VGG configurations A, B, D, E.
CONVS_PER_BLOCK = {
    'vgg11': (1, 1, 2, 2, 2), 'vgg13': (2, 2, 2, 2, 2), 'vgg16': (2, 2, 3, 3, 3), 'vgg19': (2, 2, 4, 4, 4),
}

#: The seed study's figure (finally-lrp-vgg.png) for VGG16 with the default parameters, rule text as printed.
SEED_FIGURE = {
    'z^B (low=0, high=1)': ['conv1_1'],
    'LRP-γ (γ=0.1)': ['conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3'],
    'LRP-ε (ε=0.25)': ['conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3'],
    'LRP-0': ['fc1', 'fc2', 'fc3'],
}


def structure_only(arch):
    """A torchvision VGG on the meta device: the module structure without allocating or initialising weights."""
    with torch.device('meta'):
        return getattr(torchvision.models, arch)(weights=None, num_classes=3)


def expected_conv_groups(convs_per_block, epsilon_from_block=4):
    """``[(layer, group)]`` of the convolutions: conv1_1 z^B, blocks before ``epsilon_from_block`` γ, the rest ε."""
    def group(block, position):
        if (block, position) == (1, 1):
            return 'first_conv'
        return 'gamma_conv' if block < epsilon_from_block else 'epsilon_conv'
    return [
        (f'conv{block}_{position}', group(block, position))
        for block, count in enumerate(convs_per_block, start=1)
        for position in range(1, count + 1)
    ]


@pytest.mark.parametrize('batch_norm', [False, True], ids=['plain', 'bn'])
@pytest.mark.parametrize('arch', CONVS_PER_BLOCK)
def test_torchvision_vgg_rule_mapping(arch, batch_norm):
    convs_per_block = CONVS_PER_BLOCK[arch]
    model = structure_only(arch + ('_bn' if batch_norm else ''))
    rows = VGGComposite(fast=False, low=0., high=1.).layer_rules(model)
    by_module = {}
    for row in rows:
        by_module.setdefault(row.module, []).append(row)

    conv_rows = by_module['Conv2d']
    assert [(row.layer, row.group) for row in conv_rows] == expected_conv_groups(convs_per_block)
    hook_types = {'first_conv': zennit_rules.ZBox, 'gamma_conv': zennit_rules.Gamma,
                  'epsilon_conv': zennit_rules.Epsilon}
    assert all(type(row.hook) is hook_types[row.group] for row in conv_rows)

    linear_rows = by_module['Linear']
    assert [(row.layer, row.group, row.rule) for row in linear_rows] == [
        ('fc1', 'linear', 'LRP-0'), ('fc2', 'linear', 'LRP-0'), ('fc3', 'linear', 'LRP-0')
    ]
    assert all(type(row.hook) is zennit_rules.Epsilon for row in linear_rows)

    assert len(by_module['ReLU']) == sum(convs_per_block) + 2
    assert all(row.group == 'activation' and type(row.hook) is zennit_rules.Pass for row in by_module['ReLU'])
    assert [(row.layer, row.group) for row in by_module['MaxPool2d']] == [(f'pool{k}', 'maxpool') for k in range(1, 6)]
    assert all(row.hook is None for row in by_module['MaxPool2d'])
    (avgpool,) = by_module['AdaptiveAvgPool2d']
    assert avgpool.group == 'avgpool' and type(avgpool.hook) is zennit_rules.Norm
    assert all(row.group == 'identity' and row.hook is None for row in by_module['Dropout'])
    assert len(by_module.get('BatchNorm2d', [])) == (sum(convs_per_block) if batch_norm else 0)
    assert all(row.group == 'batchnorm' for row in by_module.get('BatchNorm2d', []))
    assert not [row for row in rows if row.group == 'uncovered']


def test_fast_rules_cover_the_same_layers():
    model = structure_only('vgg16')
    fast, stock = VGGComposite(fast=True).layer_rules(model), VGGComposite(fast=False).layer_rules(model)
    assert [(row.name, row.group, row.rule) for row in fast] == [(row.name, row.group, row.rule) for row in stock]
    assert [row.hook is None for row in fast] == [row.hook is None for row in stock]


def test_epsilon_from_block_and_epsilon_linears_move_the_boundaries():
    rows = rule_table(structure_only('vgg16'), epsilon_from_block=3, epsilon_linears=2)
    conv_groups = [(row.layer, row.group) for row in rows if row.module == 'Conv2d']
    assert conv_groups == expected_conv_groups(CONVS_PER_BLOCK['vgg16'], epsilon_from_block=3)
    assert [row.group for row in rows if row.module == 'Linear'] == ['epsilon_linear', 'epsilon_linear', 'linear']


def test_vgg16_rule_table_text_is_the_seed_figure():
    text = format_rule_table(rule_table(structure_only('vgg16'), low=0., high=1.))
    header, *lines = text.splitlines()
    assert header.split() == ['module', 'layer', 'type', 'rule']
    rule_of_layer = {}
    for line in lines:
        module, layer, module_type, rule = line.split(maxsplit=3)
        rule_of_layer[layer] = rule
    for rule, layers in SEED_FIGURE.items():
        assert {layer: rule_of_layer[layer] for layer in layers} == {layer: rule for layer in layers}
    assert rule_of_layer['relu1_1'] == 'Pass'
    assert rule_of_layer['pool5'] == 'gradient (winner takes all)'
    assert rule_of_layer['avgpool'] == 'Norm'
    assert len(lines) == 13 + 13 + 5 + 1 + 3 + 2 + 2  # convs, ReLUs, max-pools, avgpool, fcs, their ReLUs, dropouts


@pytest.mark.parametrize('kwargs, message', [
    ({'epsilon': -0.25}, r'epsilon must be >= 0, got -0\.25.*allow_negative=True'),
    ({'gamma': -20}, r'gamma must be >= 0, got -20'),
    ({'epsilon': float('nan')}, r'epsilon must be finite, got nan'),
    ({'gamma': float('inf')}, r'gamma must be finite, got inf'),
    ({'low': 1., 'high': 0.}, r'low must be < high'),
    ({'low': .5, 'high': .5}, r'low must be < high'),
    ({'low': torch.zeros(1, 3, 1, 1), 'high': torch.tensor([1., -1., 1.]).reshape(1, 3, 1, 1)}, r'low must be < high'),
    ({'low': torch.zeros(1, 3, 1, 1), 'high': torch.ones(1, 2, 1, 1)}, r'\(1, 3, 1, 1\).*\(1, 2, 1, 1\).*broadcast'),
    ({'low': float('-inf'), 'high': 1.}, r'finite'),
    ({'low': None, 'high': 1.}, r'both z\^B bounds or neither.*low=None, high=1\.0'),
    ({'low': 0.}, r'both z\^B bounds or neither'),
    ({'epsilon_from_block': 0}, r'epsilon_from_block must be an integer >= 1, got 0'),
    ({'epsilon_from_block': 2.5}, r'epsilon_from_block.*2\.5'),
    ({'epsilon_linears': -1}, r'epsilon_linears must be an integer >= 0, got -1'),
])
def test_invalid_parameters_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VGGComposite(**kwargs)


def test_negative_parameters_are_accepted_when_allowed():
    composite = VGGComposite(epsilon=-20., gamma=-20., allow_negative=True)
    assert (composite.epsilon, composite.gamma) == (-20., -20.)
    rules = {row.layer: row.rule for row in composite.layer_rules(structure_only('vgg16'))}
    assert (rules['conv2_1'], rules['conv4_1']) == ('LRP-γ (γ=-20)', 'LRP-ε (ε=-20)')


def test_registered_in_zennit_composites():
    assert lrp_brain.VGGComposite is VGGComposite
    assert COMPOSITES['lrp_brain_vgg'] is VGGComposite
    composite = COMPOSITES['lrp_brain_vgg'](epsilon=.5, gamma=.2)
    assert (composite.epsilon, composite.gamma) == (.5, .2)


@pytest.mark.parametrize('transform, expected', [
    ({'value_range': (0, 1)}, (0., 1.)),
    (SimpleNamespace(value_range=(0., 255.)), (0., 255.)),
    ({}, (0., 1.)),
])
def test_zbox_bounds_without_normalisation(transform, expected):
    low, high = zbox_bounds(transform)
    assert (low, high) == expected and isinstance(low, float) and isinstance(high, float)


def test_zbox_bounds_with_mean_std_normalisation():
    transform = SimpleNamespace(value_range=(0, 1), mean=[.5, .4, .3], std=[.2, .25, .5])
    low, high = zbox_bounds(transform)
    assert low.shape == high.shape == (1, 3, 1, 1)
    # (0 - μ)/σ and (1 - μ)/σ per channel, by hand
    assert torch.allclose(low.flatten(), torch.tensor([-2.5, -1.6, -.6]))
    assert torch.allclose(high.flatten(), torch.tensor([2.5, 2.4, 1.4]))


@pytest.mark.parametrize('transform, message', [
    ({'mean': [.5, .5, .5]}, r'std=None'),
    ({'mean': [.5], 'std': [0.]}, r'std must be positive'),
])
def test_zbox_bounds_reject_incomplete_normalisation(transform, message):
    with pytest.raises(ValueError, match=message):
        zbox_bounds(transform)


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('classes', [1, 4])
def test_foreign_classifier_head(classes, fast):
    """A head that is not VGG's (two Linears, any number of classes) gets LRP-0 / LRP-ε and matches the reference."""
    def head(in_features):
        return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Dropout(.3), nn.Linear(16, classes))

    model = random_vgg(head=head, num_classes=classes, seed=classes)
    rows = rule_table(model, epsilon_linears=1, low=0., high=1.)
    assert [(row.layer, row.group) for row in rows if row.module == 'Linear'] == [
        ('fc1', 'epsilon_linear'), ('fc2', 'linear')
    ]
    input = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    attr_output = torch.zeros(2, classes, dtype=torch.float64)
    attr_output[:, classes - 1] = 1.
    with Gradient(model, VGGComposite(epsilon_linears=1, fast=fast, low=0., high=1.)) as attributor:
        output, relevance = attributor(input, attr_output)
    assert output.shape == (2, classes)
    _, expected = reference_lrp(model, input, attr_output=attr_output, epsilon_linears=1)
    assert ((relevance - expected).abs().max() / expected.abs().max()).item() <= 1e-6


def test_hooks_are_removed_after_the_context():
    model = random_vgg(seed=5)
    input = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def output_and_gradient():
        input_leaf = input.clone().requires_grad_()
        output = model(input_leaf)
        (gradient,) = torch.autograd.grad(output[0, 1], input_leaf)
        return output.detach(), gradient

    output_before, gradient_before = output_and_gradient()
    with Gradient(model, VGGComposite()):
        output_inside, relevance_inside = output_and_gradient()
    output_after, gradient_after = output_and_gradient()

    assert torch.allclose(output_inside, output_before)
    assert not torch.allclose(relevance_inside, gradient_before), 'the composite had no effect inside its context'
    assert torch.equal(output_after, output_before)
    assert torch.equal(gradient_after, gradient_before)
    for module in model.modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
        assert not any(hooks), f'hooks left on {module}'


# --- z^B bounds: checked when given, each sample's own when not -----------------------------------------------------

IMAGENET = Transform(size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def normalised_images(count=2, transform=IMAGENET, seed=0):
    """``(count, 3, 32, 32)`` float64 made by the project's transform from random 40×40 slices (min–max, antialiased
    resize, ImageNet mean/std normalisation in float32)."""
    rng = np.random.default_rng(seed)
    return torch.stack([transform(rng.integers(0, 800, (40, 40)).astype(np.int16))[0] for _ in range(count)]).double()


def lrp(model, composite, input, target=0):
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(input, torch.eye(3, dtype=input.dtype)[[target] * len(input)])
    return relevance


def sample_bounds(input):
    """Each sample's per-channel minimum and maximum, ``(N, C, 1, 1)``, computed here by hand."""
    flat = input.flatten(2)
    return flat.min(dim=2).values[..., None, None], flat.max(dim=2).values[..., None, None]


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
def test_imagenet_normalised_input_against_bounds_0_1_raises_naming_range_bounds_and_remedy(fast):
    model, input = random_vgg(), normalised_images()
    expected_low, expected_high = zbox_bounds(IMAGENET)
    assert input.min() < -1.5 and input.max() > 2  # what ImageNet normalisation of [0, 1] gives
    observed = ', '.join(f'[{low:.3g}, {high:.3g}]' for low, high in zip(input.amin((0, 2, 3)), input.amax((0, 2, 3))))
    message = (rf'first layer features\.0 lies in \[{input.min():.3g}, {input.max():.3g}\] \(per channel '
               rf'{re.escape(observed)}\), outside the z\^B bounds low=0, high=1.*zbox_bounds\(transform\)'
               r'.*ImageNet.*low=\[-2\.12, -2\.04, -1\.8\], high=\[2\.25, 2\.43, 2\.64\].*low=None, high=None'
               r'.*check_bounds=False')
    with pytest.raises(ValueError, match=message):
        lrp(model, VGGComposite(low=0., high=1., fast=fast), input)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())

    relevance = lrp(model, VGGComposite(low=expected_low, high=expected_high, fast=fast), input)
    _, reference = reference_lrp(model, input, attr_output=torch.eye(3, dtype=torch.float64)[[0, 0]],
                                 low=expected_low.double(), high=expected_high.double())
    assert ((relevance - reference).abs().max() / reference.abs().max()).item() <= 1e-6
    unchecked = lrp(model, VGGComposite(low=0., high=1., fast=fast, check_bounds=False), input)
    assert torch.isfinite(unchecked).all()


def test_explain_with_the_transforms_bounds_passes_and_with_the_default_bounds_raises():
    """The project's own path: bounds from ``zbox_bounds(transform)`` never trip the check; explain's default bounds
    (0, 1: min–max input) on normalised input do."""
    model, input = random_vgg(), normalised_images()
    low, high = zbox_bounds(IMAGENET)
    explanation = explain(model, input, target=1, low=low, high=high)
    assert torch.isfinite(explanation.relevance).all()
    minmax = normalised_images(transform=Transform(size=32))
    assert minmax.min() >= 0 and minmax.max() <= 1
    assert torch.isfinite(explain(model, minmax, target=1, low=0., high=1.).relevance).all()
    with pytest.raises(ValueError, match=r'outside the z\^B bounds low=0, high=1'):
        explain(model, input, target=1)


@pytest.mark.parametrize('excess, raises', [(.5, False), (2., True)])
def test_bounds_tolerance_is_relative_to_the_box(excess, raises):
    """An input ``excess`` tolerances above ``high`` in one channel: half a tolerance passes, two raise."""
    low, high = torch.tensor([-1., 0., 2.]).reshape(1, 3, 1, 1), torch.tensor([1., 4., 3.]).reshape(1, 3, 1, 1)
    input = low + (high - low) * torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64)
    input[0, 1, 3, 4] = 4. + excess * BOUNDS_TOLERANCE * 4.
    composite = VGGComposite(low=low, high=high)
    if raises:
        with pytest.raises(ValueError, match=r'outside the z\^B bounds low=\[-1, 0, 2\], high=\[1, 4, 3\]'):
            lrp(random_vgg(), composite, input)
    else:
        assert torch.isfinite(lrp(random_vgg(), composite, input)).all()


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
def test_registry_composite_without_bounds_takes_each_samples_bounds(fast):
    """``COMPOSITES['lrp_brain_vgg'](canonizers=...)`` in a plain Zennit script on ImageNet-normalised input: the
    first layer's box is each sample's per-channel minimum and maximum, against the reference LRP (on the BatchNorms
    folded by hand) and against the composite given those bounds; a sample's relevance does not depend on the batch."""
    model = random_vgg(batch_norm=True, seed=3)
    input = normalised_images(3, seed=1)
    low, high = sample_bounds(input)
    composite = COMPOSITES['lrp_brain_vgg'](canonizers=[MergeBatchNormIntoPrevious()], fast=fast)
    assert (composite.low, composite.high) == (None, None)
    relevance = lrp(model, composite, input)
    _, reference = reference_lrp(fold_batch_norms(model), input, attr_output=torch.eye(3, dtype=torch.float64)[[0] * 3],
                                 low=low, high=high)
    assert ((relevance - reference).abs().max() / reference.abs().max()).item() <= 1e-6
    given = lrp(model, VGGComposite(low=low, high=high, canonizers=[MergeBatchNormIntoPrevious()], fast=fast), input)
    assert ((relevance - given).abs().max() / given.abs().max()).item() <= 1e-12
    alone = lrp(model, composite, input[1:2])
    assert ((relevance[1:2] - alone).abs().max() / alone.abs().max()).item() <= 1e-12
    # the box matters: the global bounds of the transform give another first-layer relevance
    global_low, global_high = zbox_bounds(IMAGENET)
    imagenet = lrp(model, VGGComposite(low=global_low, high=global_high, canonizers=[MergeBatchNormIntoPrevious()]),
                   input)
    assert (relevance - imagenet).abs().max() > 1e-3 * imagenet.abs().max()


def test_rule_table_says_which_bounds():
    model = structure_only('vgg16')
    first = {'default': rule_table(model)[0].rule, 'given': rule_table(model, low=-1., high=2.)[0].rule,
             'mlp': rule_table(nn.Sequential(nn.Linear(4, 3)))[0].rule}
    assert first == {'default': "z^B (low, high: each sample's per-channel minimum and maximum)",
                     'given': 'z^B (low=-1, high=2)', 'mlp': "z^B (low, high: each sample's minimum and maximum)"}


def test_zennits_zbox_with_sample_bounds_equals_the_fast_rule_on_a_linear_layer():
    """For a linear first layer the box is each sample's minimum and maximum over its features: Zennit's ZBox given
    those bounds by hand, :class:`SampleBoundsZBox` and the fast rule agree."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    input = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = input.min(dim=1, keepdim=True).values, input.max(dim=1, keepdim=True).values
    rest = [(('1',), zennit_rules.Pass()), (('2',), zennit_rules.Epsilon(STABILIZER))]
    expected = lrp(model, NameMapComposite([(('0',), zennit_rules.ZBox(low, high))] + rest), input)
    stock = lrp(model, NameMapComposite([(('0',), SampleBoundsZBox(model[0]))] + rest), input)
    fast = lrp(model, NameMapComposite([(('0',), fast_rules.ZBox(None, None))] + rest), input)
    assert torch.allclose(stock, expected, rtol=0, atol=1e-12 * expected.abs().max())
    assert torch.allclose(fast, expected, rtol=0, atol=1e-9 * expected.abs().max())
    assert torch.allclose(lrp(model, VGGComposite(fast=False), input), expected, rtol=0,
                          atol=1e-12 * expected.abs().max())


# --- layer groups from the forward order of any feed-forward network ---------------------------------------------

def flat_sequential(model):
    """The same network as one ``nn.Sequential`` of its leaf modules (no ``features``/``classifier``)."""
    return nn.Sequential(*model.features, model.avgpool, nn.Flatten(), *model.classifier)


@pytest.mark.parametrize('convert', [flat_sequential, torch.fx.symbolic_trace], ids=['sequential', 'fx-graph'])
@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
def test_converted_vgg_gets_the_vgg_mapping_and_the_reference_relevance(convert, fast):
    model = random_vgg(seed=2)
    converted = convert(model)
    options = dict(epsilon_linears=1, low=0., high=1., fast=fast)
    expected_rows = [(row.module, row.group, row.rule) for row in rule_table(model, **options)]
    rows = [(row.module, row.group, row.rule) for row in rule_table(converted, **options)]
    assert [row for row in rows if row[0] != 'Flatten'] == expected_rows
    input = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    relevance = lrp(converted, VGGComposite(**options), input, target=2)
    _, reference = reference_lrp(model, input, attr_output=torch.eye(3, dtype=torch.float64)[[2, 2]],
                                 epsilon_linears=1)
    assert ((relevance - reference).abs().max() / reference.abs().max()).item() <= 1e-6


def small_net(conv, pool, dims, first_linear=False):
    """A feed-forward net of ``conv`` layers (``dims`` spatial dimensions) in two blocks, or a linear layer first."""
    torch.manual_seed(dims)
    layers = [nn.Flatten(), nn.Linear(2 * 4 ** dims, 2 * 4 ** dims), nn.ReLU(), nn.Unflatten(1, (2,) + (4,) * dims)] \
        if first_linear else [conv(2, 2, 3, padding=1), nn.ReLU()]
    layers += [conv(2, 3, 3, padding=1), nn.ReLU(), pool(2), conv(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
               nn.Linear(3 * 2 ** dims, 5), nn.ReLU(), nn.Dropout(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double().eval()


NETS = {
    'conv1d': (nn.Conv1d, nn.MaxPool1d, 1, False),
    'conv3d': (nn.Conv3d, nn.MaxPool3d, 3, False),
    'convtranspose2d': (nn.ConvTranspose2d, nn.MaxPool2d, 2, False),
    'linear-first': (nn.Conv2d, nn.MaxPool2d, 2, True),
}


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
@pytest.mark.parametrize('net', NETS)
def test_any_feed_forward_net_gets_the_mapping_by_hand(net, fast):
    """Conv1d/3d, transposed and linear-first nets (block 2 from ``epsilon_from_block=2``): the groups written out by
    hand, and the relevance of a Zennit NameMapComposite that assigns the same Zennit rules by name."""
    conv, pool, dims, first_linear = NETS[net]
    model = small_net(conv, pool, dims, first_linear)
    options = dict(epsilon=.5, gamma=.25, low=-1., high=1., epsilon_from_block=2, epsilon_linears=1)
    rows = rule_table(model, **options)
    expected = ['first_conv', 'activation', 'gamma_conv', 'activation', 'maxpool', 'epsilon_conv', 'activation',
                'identity', 'epsilon_linear', 'activation', 'identity', 'linear']
    if first_linear:
        expected = ['identity', 'first_conv', 'activation', 'identity'] + expected[2:]
    assert [row.group for row in rows] == expected
    by_group = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row.name)
    rules = {'first_conv': zennit_rules.ZBox(-1., 1.), 'gamma_conv': zennit_rules.Gamma(.25),
             'epsilon_conv': zennit_rules.Epsilon(.5), 'epsilon_linear': zennit_rules.Epsilon(.5),
             'linear': zennit_rules.Epsilon(STABILIZER), 'activation': zennit_rules.Pass()}
    by_hand = NameMapComposite([(tuple(by_group[group]), rule) for group, rule in rules.items()])
    input = torch.rand(3, 2, *(4,) * dims, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    expected_relevance = lrp(model, by_hand, input, target=1)
    relevance = lrp(model, VGGComposite(fast=fast, **options), input, target=1)
    assert expected_relevance.abs().max() > 0
    assert ((relevance - expected_relevance).abs().max() / expected_relevance.abs().max()).item() <= 1e-6


class Reordered(nn.Module):
    """Registers its linear head before the convolution its forward pass runs first."""
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4 * 8 * 8, 3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, input):
        return self.head(torch.relu(self.conv(input)).flatten(1))


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
def test_registration_order_unlike_the_forward_order_raises_at_the_first_forward(fast):
    model = Reordered().double()
    assert [row.group for row in rule_table(model)] == ['first_conv', 'gamma_conv']  # what registration order says
    input = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"runs them in another order \(conv, head\): conv \(Conv2d\) is in group "
                                         r"'gamma_conv' by registration but 'first_conv' by the forward pass"):
        lrp(model, VGGComposite(fast=fast), input)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_order_is_checked_once_per_context():
    """The order hooks leave after the first forward pass; the bounds check stays for every call."""
    model = random_vgg()
    composite = VGGComposite(low=0., high=1.)
    input = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with composite.context(model):
        hooked = sum(len(module._forward_pre_hooks) for module in model.modules())
        model(input)
        after = sum(len(module._forward_pre_hooks) for module in model.modules())
        with pytest.raises(ValueError, match='outside the z'):
            model(input + 2)
    leaves = len([module for module in model.modules() if not list(module.children())])
    assert hooked - after == leaves
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


class Unhookable(nn.Conv2d):
    """A convolution that refuses forward hooks, so no rule can attach to it."""
    def register_forward_hook(self, *args, **kwargs):
        raise RuntimeError('no hooks on this layer')

    register_forward_pre_hook = register_forward_hook


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'zennit'])
def test_registration_is_all_or_nothing(fast):
    """A rule that cannot attach to conv4_1: no hook stays on the layers before it, and the canonizers are undone."""
    model = random_vgg(batch_norm=True, seed=1)
    conv = model.features[20]
    assert isinstance(conv, nn.Conv2d) and isinstance(model.features[21], nn.BatchNorm2d)
    refusing = Unhookable(conv.in_channels, conv.out_channels, 3, padding=1).double()
    refusing.load_state_dict(conv.state_dict())
    model.features[20] = refusing
    modules = dict(model.named_modules())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(RuntimeError, match='no hooks on this layer'):
        with Gradient(model, VGGComposite(fast=fast)):
            pass
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
