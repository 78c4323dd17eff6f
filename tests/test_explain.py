"""Tests of lrp_brain.explain against direct Zennit and autograd computations written in the tests."""
import pytest
import torch
from torch import nn
from torchvision.models.vgg import VGG, make_layers
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox
from zennit.torchvision import VGGCanonizer

from lrp_brain.composites import VGGComposite
from lrp_brain.explain import METHODS, ExplainError, explain, explain_all_classes, resolve_targets

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

#: VGG16's layer configuration with the widths divided by 16.
SMALL_VGG16_CFG = [4, 4, 'M', 8, 8, 'M', 16, 16, 16, 'M', 32, 32, 32, 'M', 32, 32, 32, 'M']
CLASSES = 3


def small_vgg16(batch_norm=False, seed=0):
    """A VGG16-topology network (13 convs in 5 blocks, 3 Linears) of small width.

    He-initialised weights keep the signal (and so the relevance) of order 1 through the 13 layers; biases and
    BatchNorm statistics are random and non-zero, so that they matter.
    """
    torch.manual_seed(seed)
    model = VGG(make_layers(SMALL_VGG16_CFG, batch_norm=batch_norm), num_classes=CLASSES, init_weights=False)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(
        nn.Linear(32, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(),
        nn.Linear(16, CLASSES),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
                module.bias.uniform_(-0.05, 0.05)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope='module')
def model():
    return small_vgg16()


@pytest.fixture(scope='module')
def images():
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


LABELS = torch.tensor([0, 2, 1, 1, 0])


def reference_gradient(model, images, targets):
    """The gradient of each image's target logit, with plain autograd."""
    inputs = images.clone().requires_grad_(True)
    logits = model(inputs)
    selected = logits.gather(1, targets[:, None]).sum()
    gradient, = torch.autograd.grad(selected, inputs)
    return gradient


def reference_zennit(model, images, targets, composite):
    """The attribution of a direct Zennit call with the one-hot output relevance."""
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(images.clone(), torch.eye(CLASSES)[targets])
    return relevance


def assert_same_map(actual, expected, relative=1e-5):
    """Assert two maps are equal to ``relative`` times the largest magnitude, and that the maps are not vanishing."""
    scale = expected.abs().max().item()
    assert scale > 1e-3, f'vanishing reference map (max |value| {scale:g}): the test would prove nothing'
    torch.testing.assert_close(actual, expected, rtol=relative, atol=relative * scale)


def assert_different_maps(first, second):
    """Assert two maps differ by more than rounding: by at least 1 % of their largest magnitude somewhere."""
    scale = max(first.abs().max().item(), second.abs().max().item())
    assert (first - second).abs().max().item() > 1e-2 * scale


def test_gradient_is_the_target_logit_gradient(model, images):
    explanation = explain(model, images, labels=LABELS, method='gradient')
    assert_same_map(explanation.relevance, reference_gradient(model, images, LABELS))


def test_gradxinput_is_gradient_times_input(model, images):
    explanation = explain(model, images, labels=LABELS, method='gradxinput')
    assert_same_map(explanation.relevance, reference_gradient(model, images, LABELS) * images)


def test_lrp_equals_a_direct_zennit_call_with_vgg_composite(model, images):
    explanation = explain(model, images, labels=LABELS, method='lrp', epsilon=0.5, gamma=0.3, low=0., high=1.)
    expected = reference_zennit(model, images, LABELS, VGGComposite(0.5, 0.3, 0., 1.))
    assert_same_map(explanation.relevance, expected)
    assert_different_maps(explanation.relevance, reference_gradient(model, images, LABELS))


def test_lrp_passes_composite_kwargs_and_tensor_bounds(model, images):
    low, high = torch.full((1, 3, 1, 1), -0.5), torch.tensor([1., 2., 3.]).reshape(1, 3, 1, 1)
    explanation = explain(model, images, labels=LABELS, low=low, high=high, composite_kwargs={'epsilon_from_block': 2})
    expected = reference_zennit(model, images, LABELS, VGGComposite(0.25, 0.1, low, high, epsilon_from_block=2))
    assert_same_map(explanation.relevance, expected)
    default = explain(model, images, labels=LABELS, low=low, high=high)
    assert_different_maps(explanation.relevance, default.relevance)


def test_zennit_egb_equals_stock_epsilon_gamma_box_with_the_given_bounds_and_bn_merged(images):
    model = small_vgg16(batch_norm=True, seed=3)
    explanation = explain(model, images, labels=LABELS, method='zennit-egb', low=0., high=1.)
    expected = reference_zennit(model, images, LABELS, EpsilonGammaBox(low=0., high=1., canonizers=[VGGCanonizer()]))
    assert_same_map(explanation.relevance, expected)
    # the canonizer matters on a BatchNorm model, and so do the bounds (ImageNet bounds for [0, 1] input differ)
    unmerged = reference_zennit(model, images, LABELS, EpsilonGammaBox(low=0., high=1.))
    assert_different_maps(explanation.relevance, unmerged)
    imagenet = reference_zennit(model, images, LABELS, EpsilonGammaBox(
        low=-2.1179, high=2.64, canonizers=[VGGCanonizer()]))
    assert_different_maps(explanation.relevance, imagenet)


def test_zennit_egb_takes_composite_kwargs(model, images):
    explanation = explain(model, images, labels=LABELS, method='zennit-egb', composite_kwargs={'gamma': 0.7})
    expected = reference_zennit(model, images, LABELS, EpsilonGammaBox(low=0., high=1., gamma=0.7))
    assert_same_map(explanation.relevance, expected)


@pytest.mark.parametrize('method', ['lrp', 'gradxinput'])
def test_batches_equal_one_big_batch(model, images, method):
    batched = explain(model, images, labels=LABELS, method=method, batch_size=2)
    whole = explain(model, images, labels=LABELS, method=method, batch_size=5)
    assert_same_map(batched.relevance, whole.relevance)
    torch.testing.assert_close(batched.logits, whole.logits)
    torch.testing.assert_close(batched.probabilities, whole.probabilities)
    assert torch.equal(batched.targets, whole.targets)
    assert torch.equal(batched.predictions, whole.predictions)


def test_outputs_are_the_models(model, images):
    explanation = explain(model, images, labels=LABELS, method='gradient', batch_size=2)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(explanation.logits, logits)
    torch.testing.assert_close(explanation.probabilities, torch.softmax(logits, dim=1))
    assert torch.equal(explanation.predictions, logits.argmax(1))
    assert explanation.relevance.shape == images.shape and explanation.relevance.device.type == 'cpu'


@pytest.mark.parametrize('target', ['label', 'pred', 2, torch.tensor([2, 0, 0, 1, 2]), [1, 1, 0, 2, 0]])
def test_targets_select_the_explained_logit(model, images, target):
    explanation = explain(model, images, target=target, labels=LABELS, method='gradient', batch_size=2)
    with torch.no_grad():
        predictions = model(images).argmax(1)
    expected = {'label': LABELS, 'pred': predictions}.get(target) if isinstance(target, str) else \
        torch.as_tensor(target).expand(5)
    assert torch.equal(explanation.targets, expected)
    assert_same_map(explanation.relevance, reference_gradient(model, images, expected))


def test_resolve_targets_by_hand():
    logits = torch.tensor([[0., 3., 1.], [5., -1., 2.]])
    assert resolve_targets('pred', logits).tolist() == [1, 0]
    assert resolve_targets('label', logits, labels=[2, 2]).tolist() == [2, 2]
    assert resolve_targets(1, logits).tolist() == [1, 1]
    assert resolve_targets(torch.tensor([0, 2]), logits).tolist() == [0, 2]
    assert resolve_targets(torch.tensor(2), logits).dtype == torch.long


@pytest.mark.parametrize('target, labels, message', [
    ('truth', None, "one of ('label', 'pred')"),
    ('label', None, 'needs the images'),
    (3, None, 'target of image 0 is class 3'),
    (-1, None, 'target of image 0 is class -1'),
    ([0, 5], None, 'target of image 1 is class 5'),
    ('label', [0, 1, 2], 'one class index per image (2 images)'),
    ('label', [0, 7], 'labels of image 1 is class 7'),
    (torch.tensor([0.5, 1.]), None, 'integer class indices'),
    (True, None, 'bool'),
])
def test_resolve_targets_rejects(target, labels, message):
    with pytest.raises(ExplainError, match=message.replace('(', r'\(').replace(')', r'\)')):
        resolve_targets(target, torch.zeros(2, 3), labels=labels)


def test_bad_method_lists_the_valid_ones(model, images):
    with pytest.raises(ValueError, match="'lrp', 'gradient', 'gradxinput', 'zennit-egb'"):
        explain(model, images, labels=LABELS, method='lrp-epsilon')


def test_nonfinite_image_is_named(model, images):
    broken = images.clone()
    broken[3, 1, 4, 4] = float('nan')
    with pytest.raises(ValueError, match='image 3 has NaN'):
        explain(model, broken, labels=LABELS)


@pytest.mark.parametrize('images, message', [
    (torch.rand(3, 32, 32), r'\(N, C, H, W\)'),
    (torch.ones(2, 3, 32, 32, dtype=torch.uint8), 'floating point'),
])
def test_bad_images(model, images, message):
    with pytest.raises(ExplainError, match=message):
        explain(model, images, target='pred')


def test_bad_arguments(model, images):
    with pytest.raises(ExplainError, match='batch_size'):
        explain(model, images, labels=LABELS, batch_size=0)
    with pytest.raises(ExplainError, match='uses no composite'):
        explain(model, images, labels=LABELS, method='gradient', composite_kwargs={'fast': False})
    with pytest.raises(ValueError, match='gamma must be >= 0'):
        explain(model, images, labels=LABELS, gamma=-1.)


def test_model_state_is_restored_and_hooks_removed_even_after_an_error(images):
    model = small_vgg16(batch_norm=True, seed=5).train()
    model.features[0].weight.requires_grad_(False)
    with torch.no_grad():
        before = model.eval()(images)
    gradient_before = reference_gradient(model, images, LABELS)
    model.train()
    explain(model, images, labels=LABELS, batch_size=2)
    # the label of image 3 is out of range: the error comes in the second batch, with the hooks registered
    with pytest.raises(ExplainError, match='labels of image 3 is class 9'):
        explain(model, images, labels=[0, 1, 2, 9, 0], batch_size=2, method='zennit-egb')
    assert model.training and all(module.training for module in model.modules())
    assert not model.features[0].weight.requires_grad and model.features[3].weight.requires_grad
    assert all(parameter.grad is None for parameter in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), before)
    assert torch.equal(reference_gradient(model, images, LABELS), gradient_before)
    assert all(not module._forward_hooks and not module._backward_hooks for module in model.modules())


def test_caller_images_untouched(model, images):
    original = images.clone()
    explain(model, images, labels=LABELS, method='gradxinput')
    assert not images.requires_grad and images.grad is None and torch.equal(images, original)


def test_explain_all_classes_gives_one_map_per_class(model, images):
    explanation = explain_all_classes(model, images[2], method='lrp', epsilon=0.1)
    assert explanation.relevance.shape == (CLASSES, 3, 32, 32)
    assert explanation.targets.tolist() == list(range(CLASSES))
    for k in range(CLASSES):
        single = explain(model, images[2:3], target=k, epsilon=0.1)
        assert_same_map(explanation.relevance[k:k + 1], single.relevance)
        torch.testing.assert_close(explanation.probabilities[k], single.probabilities[0])
    with pytest.raises(ExplainError, match='target= cannot be given'):
        explain_all_classes(model, images[2], target=1)
    with pytest.raises(ExplainError, match='one image'):
        explain_all_classes(model, images[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('method', METHODS)
def test_cuda_matches_cpu_and_model_stays_on_cpu(model, images, method):
    on_cuda = explain(model, images, labels=LABELS, method=method, device='cuda', batch_size=2)
    on_cpu = explain(model, images, labels=LABELS, method=method)
    assert on_cuda.relevance.device.type == 'cpu' and next(model.parameters()).device.type == 'cpu'
    assert_same_map(on_cuda.relevance, on_cpu.relevance, relative=1e-3)
    assert torch.equal(on_cuda.targets, on_cpu.targets)
