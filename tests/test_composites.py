"""The rule mapping of :class:`lrp_brain.composites.VGGComposite`, its parameter checks, the registry entry, the z^B
bounds, foreign classifier heads and the clean-up after the composite's context."""
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn
from zennit import rules as zennit_rules
from zennit.attribution import Gradient
from zennit.composites import COMPOSITES

import lrp_brain
from lrp_brain.composites import VGGComposite, format_rule_table, rule_table, zbox_bounds
from reference_lrp import random_vgg, reference_lrp

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
    rows = VGGComposite(fast=False).layer_rules(structure_only(arch + ('_bn' if batch_norm else '')))
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
    text = format_rule_table(rule_table(structure_only('vgg16')))
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
    ({'low': float('-inf')}, r'finite'),
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
    rows = rule_table(model, epsilon_linears=1)
    assert [(row.layer, row.group) for row in rows if row.module == 'Linear'] == [
        ('fc1', 'epsilon_linear'), ('fc2', 'linear')
    ]
    input = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    attr_output = torch.zeros(2, classes, dtype=torch.float64)
    attr_output[:, classes - 1] = 1.
    with Gradient(model, VGGComposite(epsilon_linears=1, fast=fast)) as attributor:
        output, relevance = attributor(input, attr_output)
    assert output.shape == (2, classes)
    _, expected = reference_lrp(model, input, attr_output=attr_output, epsilon_linears=1)
    assert ((relevance - expected).abs().max() / expected.abs().max()).item() <= 1e-6


@pytest.mark.parametrize('model', [
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)),
    structure_only('resnet18'),
], ids=['sequential', 'resnet18'])
def test_non_vgg_model_raises_value_error(model):
    name = type(model).__name__
    with pytest.raises(ValueError, match=f'VGG-like.*{name}'):
        VGGComposite().layer_rules(model)
    with pytest.raises(ValueError, match=f'VGG-like.*{name}'):
        with Gradient(model, VGGComposite()):
            pass


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
