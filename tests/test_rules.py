"""The fast rules of :mod:`lrp_brain.rules` against Zennit's own rules, hand-computed cases, the reference LRP and
Zennit's hook machinery: single layers of every type the rules serve, VGG-topology networks, both dtypes, signed
inputs, zero bias, std-scaled ε, per-sample z^B bounds, batches, settings as a leading dimension (the sweep engine's
use), removal, ``Composite.inactive()`` and plain Zennit composites. Zennit's own rule tests run against these rules
as a CI step (``.ci/zennit_rules_plugin.py``)."""
import pytest
import torch
from torch import nn
from zennit import rules as zennit_rules
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite

from lrp_brain import rules
from lrp_brain.composites import VGGComposite
from reference_lrp import Affine, random_vgg, zbox_rule

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

#: Relative tolerance (of the largest reference value) per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

#: ``{kind: (layer factory, input shape)}``: every layer type the fast rules serve, with strides, dilations, groups
#: and output paddings.
LAYERS = {
    'conv': (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 9, 9)),
    'conv-strided': (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (3, 4, 9, 9)),
    'conv-grouped': (lambda: nn.Conv2d(4, 6, 3, groups=2, padding='same'), (3, 4, 9, 9)),
    'conv-valid': (lambda: nn.Conv2d(4, 6, 2, padding='valid', bias=False), (3, 4, 9, 9)),
    'linear': (lambda: nn.Linear(12, 5), (3, 12)),
    'conv1d': (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 11)),
    'conv3d-grouped': (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 4, 6)),
    'transposed1d': (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (3, 4, 7)),
    'transposed2d-grouped': (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2), (3, 4, 5, 5)),
    'transposed3d': (lambda: nn.ConvTranspose3d(4, 3, 2, bias=False), (2, 4, 3, 4, 3)),
}


def rule_pairs(low=-1., high=2.):
    """``{name: (fast rule, Zennit rule)}`` for every setting the single-layer tests compare."""
    pairs = {}
    for zero_params in (None, ['bias']):
        suffix = '' if zero_params is None else ', zero bias'
        pairs.update({
            f'epsilon{suffix}': (rules.Epsilon(0.1, zero_params), zennit_rules.Epsilon(0.1, zero_params)),
            f'lrp-0{suffix}': (rules.Epsilon(1e-6, zero_params), zennit_rules.Epsilon(1e-6, zero_params)),
            f'negative epsilon{suffix}': (rules.Epsilon(-1e-3, zero_params), zennit_rules.Epsilon(-1e-3, zero_params)),
            f'std epsilon{suffix}': (
                rules.Epsilon(rules.StdStabilizer(0.25), zero_params),
                zennit_rules.Epsilon(rules.StdStabilizer(0.25), zero_params),
            ),
            f'gamma{suffix}': (rules.Gamma(0.25, 1e-6, zero_params), zennit_rules.Gamma(0.25, 1e-6, zero_params)),
            f'gamma 0{suffix}': (rules.Gamma(0., 1e-6, zero_params), zennit_rules.Gamma(0., 1e-6, zero_params)),
            f'gamma 100{suffix}': (rules.Gamma(100., 1e-6, zero_params), zennit_rules.Gamma(100., 1e-6, zero_params)),
            f'gamma std{suffix}': (
                rules.Gamma(0.5, rules.StdStabilizer(0.1), zero_params),
                zennit_rules.Gamma(0.5, rules.StdStabilizer(0.1), zero_params),
            ),
            f'zbox{suffix}': (
                rules.ZBox(low, high, 1e-6, zero_params), zennit_rules.ZBox(low, high, 1e-6, zero_params)
            ),
        })
    return pairs


def relevance(model, composite, input, output_relevance=None):
    """Relevance of ``input`` under ``composite`` for the output relevance (default: one-hot at output index 0)."""
    input = input.clone().requires_grad_()
    with composite.context(model) as hooked:
        output = hooked(input)
        if output_relevance is None:
            output_relevance = torch.zeros_like(output)
            output_relevance.view(len(output), -1)[:, 0] = 1.
        result, = torch.autograd.grad(output, input, output_relevance)
    return result


def on_layers(rule):
    return LayerMapComposite([(rules.LAYERS, rule)])


def assert_equal_to(actual, expected, dtype):
    tolerance = TOLERANCE[dtype]
    assert actual.dtype == expected.dtype == dtype
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def layer_and_input(kind, dtype, signed, seed=0):
    torch.manual_seed(seed)
    make_layer, shape = LAYERS[kind]
    layer = make_layer().to(dtype)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_(0., 0.3)
    input = torch.randn(shape, dtype=dtype)
    return layer, input if signed else input.abs()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('signed', [False, True], ids=['non-negative', 'signed'])
@pytest.mark.parametrize('kind', LAYERS)
def test_single_layer_equals_zennit(kind, signed, dtype):
    layer, input = layer_and_input(kind, dtype, signed)
    # an output relevance on every output, of both signs: the γ rule's negative-output part is exercised too
    output_relevance = torch.randn_like(layer(input), dtype=dtype)
    for name, (fast, stock) in rule_pairs().items():
        expected = relevance(layer, on_layers(stock), input, output_relevance)
        assert_equal_to(relevance(layer, on_layers(fast), input, output_relevance), expected, dtype)


@pytest.mark.parametrize('kind', ['conv', 'linear', 'conv3d-grouped', 'transposed2d-grouped'])
def test_gamma_with_relevance_only_on_positive_outputs_equals_zennit(kind):
    """The one-pass case: non-negative input, relevance only where the output is positive (as behind a ReLU)."""
    layer, input = layer_and_input(kind, torch.float64, signed=False)
    output = layer(input).detach()
    output_relevance = torch.rand_like(output) * (output > 0)
    for gamma in (0., 0.1, 0.25, 1000.):
        expected = relevance(layer, on_layers(zennit_rules.Gamma(gamma)), input, output_relevance)
        actual = relevance(layer, on_layers(rules.Gamma(gamma)), input, output_relevance)
        assert_equal_to(actual, expected, torch.float64)


def test_gamma_by_hand():
    """One linear output z = 2·1 − 1·2 + 0.5 = 0.5 > 0, γ = 0.5: W + γW⁺ = (3, −1), b + γb⁺ = 0.75, z⁺ = 1.75."""
    layer = nn.Linear(2, 1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2., -1.]]))
        layer.bias.fill_(0.5)
    input = torch.tensor([[1., 2.]], dtype=torch.float64)
    actual = relevance(layer, on_layers(rules.Gamma(0.5, stabilizer=0.)), input)
    torch.testing.assert_close(actual, torch.tensor([[3. / 1.75, -2. / 1.75]], dtype=torch.float64))


def test_epsilon_and_zbox_by_hand():
    """z = 2·1 − 1·2 + 0.5 = 0.5; ε = 0.5 → R = x·w / 1.0. z^B with l = 0, h = 3: W⁺l = 0, W⁻h = −3,
    so z − (W⁺l + b⁺) − (W⁻h + b⁻) = 0.5 − 0.5 + 3 = 3 and R = (x·w − l·w⁺ − h·w⁻) / 3."""
    layer = nn.Linear(2, 1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2., -1.]]))
        layer.bias.fill_(0.5)
    input = torch.tensor([[1., 2.]], dtype=torch.float64)
    epsilon = relevance(layer, on_layers(rules.Epsilon(0.5)), input)
    torch.testing.assert_close(epsilon, torch.tensor([[2., -2.]], dtype=torch.float64))
    zbox = relevance(layer, on_layers(rules.ZBox(0., 3., stabilizer=0.)), input)
    torch.testing.assert_close(zbox, torch.tensor([[2. / 3., (-2. + 3.) / 3.]], dtype=torch.float64))


def test_zbox_with_per_channel_bounds_equals_zennit():
    layer, input = layer_and_input('conv', torch.float64, signed=True)
    low = torch.tensor([-3., -2.5, -2., -4.], dtype=torch.float64).reshape(1, 4, 1, 1)
    high = torch.tensor([3., 2.5, 2., 4.], dtype=torch.float64).reshape(1, 4, 1, 1)
    expected = relevance(layer, on_layers(zennit_rules.ZBox(low, high)), input)
    assert_equal_to(relevance(layer, on_layers(rules.ZBox(low, high)), input), expected, torch.float64)


@pytest.mark.parametrize('kind', LAYERS)
def test_zbox_without_bounds_takes_each_samples_bounds(kind):
    """``ZBox()`` equals z^B given each sample's per-channel minimum and maximum (for a Linear: per sample over all
    features) — Zennit's ZBox and, where it has the layer, the reference LRP — and a sample's relevance does not depend
    on the rest of its batch."""
    layer, input = layer_and_input(kind, torch.float64, signed=True)
    dims = tuple(range(1 if kind == 'linear' else 2, input.ndim))
    low, high = input.amin(dim=dims, keepdim=True), input.amax(dim=dims, keepdim=True)
    output_relevance = torch.randn_like(layer(input))
    actual = relevance(layer, on_layers(rules.ZBox()), input, output_relevance)
    expected = relevance(layer, on_layers(zennit_rules.ZBox(low, high)), input, output_relevance)
    assert_equal_to(actual, expected, torch.float64)
    if kind in ('conv', 'conv-strided', 'linear'):
        independent = zbox_rule(Affine(layer), input, output_relevance, low, high, zero_bias=False)
        assert_equal_to(actual, independent, torch.float64)
    alone = relevance(layer, on_layers(rules.ZBox()), input[1:2], output_relevance[1:2])
    assert_equal_to(alone, actual[1:2], torch.float64)
    batch_bounds = relevance(layer, on_layers(rules.ZBox(input.min(), input.max())), input, output_relevance)
    assert not torch.allclose(batch_bounds, actual)


def with_weight(layer, weight, bias, input):
    """``layer`` applied to ``input`` with another weight and bias, by the module's own forward."""
    return torch.func.functional_call(layer, {'weight': weight, 'bias': bias}, (input,))


@pytest.mark.parametrize('kind', LAYERS)
def test_layer_passes_with_stacked_terms_and_settings_equal_the_modules_own(kind):
    """``layer_forward`` of several (input, weight) terms and ``layer_backward`` of several weights for relevance
    with a leading settings dimension (the sweep engine's use) equal the module's forward and its autograd input
    gradient, term by term and setting by setting."""
    layer, input = layer_and_input(kind, torch.float64, signed=True)
    weight = layer.weight.detach()
    weights = (weight, weight.clamp(min=0), 2 * weight + 1)
    inputs = (input, input.clamp(max=0), input.abs())
    bias = None if layer.bias is None else layer.bias.detach()
    expected = with_weight(layer, weights[0], bias, inputs[0])
    for term_input, term_weight in zip(inputs[1:], weights[1:]):
        expected = expected + with_weight(layer, term_weight, None, term_input)
    torch.testing.assert_close(rules.layer_forward(layer, inputs, weights, bias), expected)

    grad_output = torch.randn(4, *expected.shape, dtype=torch.float64)
    actual = rules.layer_backward(layer, input, weights, grad_output)
    for term_weight, term in zip(weights, actual):
        assert term.shape == (4, *input.shape)
        for setting in range(4):
            probe = input.clone().requires_grad_()
            gradient, = torch.autograd.grad(with_weight(layer, term_weight, bias, probe), probe, grad_output[setting])
            torch.testing.assert_close(term[setting], gradient)


@pytest.mark.parametrize('kind', ['conv', 'linear', 'transposed1d', 'conv3d-grouped'])
def test_gamma_denominators_for_many_gammas_equal_the_one_gamma_form(kind):
    """``z + γ·P`` with the γ-independent part of :func:`gamma_shared_part` (the sweep engine's form, for many γ)
    equals the denominator from the modified parameters (the hooks' form, Zennit's), on both output signs, for signed
    inputs and zero bias."""
    layer, input = layer_and_input(kind, torch.float64, signed=True)
    output = layer(input).detach()
    parts = (input.clamp(min=0), input.clamp(max=0))
    for zero_params in (None, 'bias'):
        weight, bias = rules.rule_parameters(layer, zero_params)
        rule_z, shared = rules.gamma_shared_part(layer, input, parts, output, weight, bias)
        for gamma in (0., .25, 3.):
            for sign in (1, -1):
                same_weight, same_bias = rules.gamma_parameters(weight, bias, gamma, sign)
                other_weight, _ = rules.gamma_parameters(weight, None, gamma, -sign)
                one_gamma, _ = rules.gamma_denominator(
                    layer, parts, (same_weight, other_weight), same_bias, output, 1e-6, sign
                )
                many_gammas, _ = rules.gamma_masked_denominator(rule_z + gamma * shared, output, 1e-6, sign)
                kept = (sign * output > 0)
                assert kept.any() and torch.isinf(one_gamma[~kept]).all() and torch.isinf(many_gammas[~kept]).all()
                torch.testing.assert_close(many_gammas[kept], one_gamma[kept], rtol=1e-10, atol=1e-12)


def test_linear_over_extra_dimensions_equals_zennit():
    torch.manual_seed(1)
    layer = nn.Linear(6, 4).double()
    input = torch.randn(2, 5, 6, dtype=torch.float64).abs()
    for fast, stock in rule_pairs().values():
        expected = relevance(layer, on_layers(stock), input)
        assert_equal_to(relevance(layer, on_layers(fast), input), expected, torch.float64)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('options', [
    {},
    {'zero_bias': True},
    {'std_epsilon': True, 'epsilon_linears': 1},
    {'epsilon': 0., 'gamma': 0.},
    {'epsilon': 1.5, 'gamma': 2.},
    {'epsilon_from_block': 2, 'low': -1., 'high': 2.},
], ids=['default', 'zero-bias', 'std-epsilon', 'lrp-0', 'large', 'signed-bounds'])
def test_vgg_composite_fast_equals_zennit_rules(options, dtype):
    model = random_vgg().to(dtype)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    if options.get('low', 0.) < 0:
        images = images * 3. - 1.
    expected = relevance(model, VGGComposite(fast=False, **options), images)
    actual = relevance(model, VGGComposite(fast=True, **options), images)
    assert_equal_to(actual, expected, dtype)
    assert actual.abs().max() > 0


def test_batch_equals_single_runs():
    model = random_vgg()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    composite = VGGComposite(std_epsilon=True, epsilon_linears=1)
    batch = relevance(model, composite, images)
    for index in range(len(images)):
        single = relevance(model, composite, images[index:index + 1])
        assert_equal_to(batch[index:index + 1], single, torch.float64)


def test_inside_plain_zennit_composites_with_inplace_relu():
    """The fast Gamma in a Zennit composite that leaves the (in-place) ReLUs unhooked, and all three fast rules in
    Zennit's own first-layer composite, equal the same composites with Zennit's rules."""
    model = random_vgg()
    assert model.features[1].inplace
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = relevance(model, LayerMapComposite([(nn.Conv2d, zennit_rules.Gamma(0.25))]), images)
    actual = relevance(model, LayerMapComposite([(nn.Conv2d, rules.Gamma(0.25))]), images)
    assert_equal_to(actual, expected, torch.float64)

    def box(module):
        return SpecialFirstLayerMapComposite(
            layer_map=[(nn.ReLU, zennit_rules.Pass()), (nn.Conv2d, module.Gamma(0.25)), (nn.Linear, module.Epsilon())],
            first_map=[(nn.Conv2d, module.ZBox(0., 1.))],
        )

    assert_equal_to(relevance(model, box(rules), images), relevance(model, box(zennit_rules), images), torch.float64)


def test_zennit_attributor():
    model = random_vgg()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    one_hot = torch.eye(3, dtype=torch.float64)[[0, 2]]
    with Gradient(model, VGGComposite(fast=True)) as attributor:
        _, actual = attributor(images, one_hot)
    with Gradient(model, VGGComposite(fast=False)) as attributor:
        _, expected = attributor(images, one_hot)
    assert_equal_to(actual, expected, torch.float64)


def test_inactive_gives_the_gradient_and_removal_restores_the_model():
    model = random_vgg()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    input = images.clone().requires_grad_()
    output = model(input)
    gradient, = torch.autograd.grad(output[:, 1].sum(), input)

    composite = VGGComposite(fast=True)
    input = images.clone().requires_grad_()
    with composite.context(model) as hooked:
        output = hooked(input)
        with composite.inactive():
            inactive, = torch.autograd.grad(output[:, 1].sum(), input, retain_graph=True)
        active, = torch.autograd.grad(output[:, 1].sum(), input)
    assert_equal_to(inactive, gradient, torch.float64)
    assert not torch.allclose(active, gradient)

    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    input = images.clone().requires_grad_()
    after, = torch.autograd.grad(model(input)[:, 1].sum(), input)
    assert_equal_to(after, gradient, torch.float64)


def test_backward_twice_through_a_retained_graph():
    model = random_vgg()
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    input = images.clone().requires_grad_()
    with VGGComposite(fast=True).context(model) as hooked:
        output = hooked(input)
        first, = torch.autograd.grad(output[:, 0].sum(), input, retain_graph=True)
        second, = torch.autograd.grad(output[:, 0].sum(), input)
    assert torch.equal(first, second)


def test_no_graph_without_gradient():
    """Under ``torch.no_grad`` (or for an input that needs no gradient) the hooked layer's output is untouched."""
    model = random_vgg()
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with VGGComposite(fast=True).context(model) as hooked, torch.no_grad():
        assert torch.equal(hooked(images), model(images))


@pytest.mark.parametrize('rule', [rules.Epsilon(0.5, ['bias']), rules.Gamma(2., 1e-3), rules.ZBox(-1., 1.)],
                         ids=['epsilon', 'gamma', 'zbox'])
def test_copy_has_the_same_settings_and_no_shared_state(rule):
    copy = rule.copy()
    assert type(copy) is type(rule) and copy is not rule
    assert vars(copy).keys() == vars(rule).keys()
    for name, value in vars(rule).items():
        if name not in ('stored_tensors', 'tensor_handles'):
            assert getattr(copy, name) == value
    assert copy.stored_tensors is not rule.stored_tensors


@pytest.mark.parametrize('module', [nn.Bilinear(2, 2, 2), nn.BatchNorm2d(2), nn.ReLU(),
                                    nn.Conv2d(2, 2, 3, padding=1, padding_mode='reflect'),
                                    nn.Conv3d(2, 2, 2, padding='same')],
                         ids=['bilinear', 'batchnorm', 'relu', 'reflect-padding', 'same-even-kernel'])
def test_unsupported_modules_are_refused(module):
    with pytest.raises(rules.RuleError, match=type(module).__name__):
        rules.Gamma().register(module)
    assert not module._forward_hooks


def test_stabilize_matches_zennit():
    values = torch.tensor([-2., -1e-9, 0., 1e-9, 3.], dtype=torch.float64)
    expected = torch.tensor([-2. - 1e-6, -1e-9 - 1e-6, 1e-6, 1e-9 + 1e-6, 3. + 1e-6], dtype=torch.float64)
    torch.testing.assert_close(rules.stabilize(values, 1e-6), expected, rtol=0., atol=0.)
    assert torch.equal(values, torch.tensor([-2., -1e-9, 0., 1e-9, 3.], dtype=torch.float64))
    std = rules.StdStabilizer(0.5)
    torch.testing.assert_close(rules.stabilize(values, std), std(values), rtol=0., atol=0.)


def test_stabilize_with_negative_and_per_setting_epsilon():
    """``z + sign(z)·ε`` with ``sign(0) = +1`` for a negative ε (the seed study's grid), and one row per setting for a
    tensor of ε's, also scaled by each sample's population standard deviation."""
    values = torch.tensor([[-2., 0., 3.], [1., 1., 4.]], dtype=torch.float64)
    torch.testing.assert_close(rules.stabilize(values, -.5),
                               torch.tensor([[-1.5, -.5, 2.5], [.5, .5, 3.5]], dtype=torch.float64))
    epsilons = rules.per_setting(torch.tensor([.5, -.5], dtype=torch.float64), values.ndim)
    torch.testing.assert_close(rules.stabilize(values, epsilons), torch.stack([values + torch.where(
        values >= 0, epsilon, -epsilon) for epsilon in (.5, -.5)]))
    # population standard deviations: √(38/9) of (-2, 0, 3) (mean 1/3), √2 of (1, 1, 4) (mean 2)
    std = torch.tensor([[(38 / 9) ** .5], [2 ** .5]], dtype=torch.float64)
    torch.testing.assert_close(rules.stabilize(values, rules.StdStabilizer(epsilons)), torch.stack([
        values + torch.where(values >= 0, epsilon * std, -epsilon * std) for epsilon in (.5, -.5)]))
