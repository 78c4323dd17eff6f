"""The sweep engine against independent single explanations: Zennit's own rules (``VGGComposite(fast=False)``)
through a Zennit ``Gradient`` attributor, one run per (ε, γ) setting."""
import pytest
import torch
from torch import nn
from torchvision.models.vgg import VGG, make_layers
from zennit.attribution import Gradient

from lrp_brain.composites import VGGComposite, zbox_bounds
from lrp_brain.sweep_engine import SweepEngine, SweepError
from reference_lrp import reference_lrp

pytestmark = pytest.mark.zennit_both

#: A VGG16 topology (13 convolutions in 5 blocks) at a small width.
SMALL_CFG = [4, 4, 'M', 6, 6, 'M', 8, 8, 8, 'M', 8, 8, 8, 'M', 8, 8, 8, 'M']

#: Largest |difference| allowed, relative to the largest |relevance| of the image, per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def small_vgg(seed=0, dtype=torch.float32, batch_norm=False, activation=None):
    """A width-reduced torchvision VGG16 with non-zero biases (and BatchNorm statistics), 3 classes, in evaluation
    mode."""
    torch.manual_seed(seed)
    with torch.device('meta'):  # VGG builds a full-size classifier first: skip its 120M parameters
        model = VGG(make_layers(SMALL_CFG), num_classes=3, init_weights=False)
    model.features = make_layers(SMALL_CFG, batch_norm=batch_norm)
    model.classifier = nn.Sequential(
        nn.Linear(8 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(),
        nn.Linear(16, 3),
    )
    if activation is not None:
        for index, module in enumerate(model.features):
            if isinstance(module, nn.ReLU):
                model.features[index] = activation()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.bias, 0., 0.05)
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0., 0.1)
            module.running_var.uniform_(0.5, 2.)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0., 0.1)
    return model.to(dtype).eval()


def zennit_relevance(model, images, targets, epsilon, gamma, **options):
    """One explanation with Zennit's rules through Zennit's Gradient attributor, one-hot output relevance."""
    composite = VGGComposite(epsilon, gamma, fast=False, **options)
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(images.clone(), torch.eye(3, dtype=images.dtype)[targets])
    return relevance


def assert_close_per_image(actual, expected, tolerance):
    scale = expected.flatten(1).abs().max(dim=1).values
    error = (actual - expected).flatten(1).abs().max(dim=1).values
    assert torch.isfinite(actual).all()
    assert (scale > 0).all()
    assert (error <= tolerance * scale).all(), (error / scale).tolist()


def assert_grid_matches(model, images, targets, epsilons, gammas, tolerance, **options):
    relevance = SweepEngine(model, epsilons, gammas, **options).relevance(images, targets)
    assert relevance.shape == (len(epsilons), len(gammas), *images.shape)
    for eps_index, epsilon in enumerate(epsilons):
        for gamma_index, gamma in enumerate(gammas):
            expected = zennit_relevance(model, images, targets, epsilon, gamma, **options)
            assert_close_per_image(relevance[eps_index, gamma_index], expected, tolerance)


def random_images(dtype, size=32, count=3, seed=1):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


TARGETS = torch.tensor([0, 1, 2])


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_grid_matches_single_explanations(dtype):
    model = small_vgg(dtype=dtype)
    assert_grid_matches(model, random_images(dtype), TARGETS, [0., .25, 1.], [0., .1, .5], TOLERANCE[dtype])


@pytest.mark.parametrize('options, epsilons, gammas', [
    (dict(epsilon_from_block=3), [0., .5], [0., .25]),
    (dict(std_epsilon=True), [0., .5], [.25]),
    (dict(epsilon_linears=1, epsilon_from_block=5), [0., .5], [.25]),
    # negative γ makes the γ denominators z + γ(W⁺x + b⁺) cancel to ~0 in places: float64 only
    (dict(allow_negative=True), [.5], [-.05, .25]),
], ids=['epsilon_from_block=3', 'std_epsilon', 'epsilon_linears=1', 'allow_negative'])
def test_options_match_single_explanations(options, epsilons, gammas):
    dtype = torch.float64
    model = small_vgg(seed=2, dtype=dtype)
    assert_grid_matches(model, random_images(dtype, seed=3), TARGETS, epsilons, gammas, TOLERANCE[dtype], **options)


def test_per_channel_bounds_match_single_explanations():
    dtype = torch.float64
    transform = dict(value_range=(0., 1.), mean=[.485, .456, .406], std=[.229, .224, .225])
    low, high = zbox_bounds(transform)
    mean, std = torch.tensor(transform['mean']).reshape(1, 3, 1, 1), torch.tensor(transform['std']).reshape(1, 3, 1, 1)
    images = ((random_images(dtype) - mean) / std).to(dtype)
    assert_grid_matches(
        small_vgg(seed=4, dtype=dtype), images, TARGETS, [.25], [0., .25], TOLERANCE[dtype],
        low=low.to(dtype), high=high.to(dtype),
    )


def test_bounds_of_each_image_by_default_match_the_reference():
    """Without bounds the engine takes each image's per-channel minimum and maximum, as the reference LRP does when it
    is given them explicitly; bounds 0 and 1 give another relevance."""
    dtype = torch.float64
    model = small_vgg(seed=16, dtype=dtype)
    images = random_images(dtype, seed=17) * torch.tensor([1., 2., 3.], dtype=dtype).reshape(1, 3, 1, 1) - .5
    low, high = images.amin(dim=(2, 3), keepdim=True), images.amax(dim=(2, 3), keepdim=True)
    grid = SweepEngine(model, [.25], [0., .25]).relevance(images, TARGETS)
    fixed = SweepEngine(model, [.25], [.25], -.5, 2.5).relevance(images, TARGETS)
    for gamma_index, gamma in enumerate([0., .25]):
        _, expected = reference_lrp(model, images, TARGETS, epsilon=.25, gamma=gamma, low=low, high=high)
        assert_close_per_image(grid[0, gamma_index], expected, TOLERANCE[dtype])
    assert (fixed[0, 0] - grid[0, 1]).abs().max() > 1e-3 * grid[0, 1].abs().max()


def test_input_outside_given_bounds_is_refused_unless_unchecked():
    dtype = torch.float64
    transform = dict(value_range=(0., 1.), mean=[.485, .456, .406], std=[.229, .224, .225])
    mean, std = torch.tensor(transform['mean']).reshape(1, 3, 1, 1), torch.tensor(transform['std']).reshape(1, 3, 1, 1)
    images = ((random_images(dtype) - mean) / std).to(dtype)
    model = small_vgg(seed=18, dtype=dtype)
    with pytest.raises(SweepError, match=r'features\.0 lies in .*outside the z\^B bounds low=0, high=1'):
        SweepEngine(model, [.25], [.25], 0., 1.).relevance(images, TARGETS)
    low, high = zbox_bounds(transform)
    SweepEngine(model, [.25], [.25], low.to(dtype), high.to(dtype)).relevance(images, TARGETS)
    unchecked = SweepEngine(model, [.25], [.25], 0., 1., check_bounds=False).relevance(images, TARGETS)
    expected = zennit_relevance(model, images, TARGETS, .25, .25, low=0., high=1., check_bounds=False)
    assert_close_per_image(unchecked[0, 0], expected, TOLERANCE[dtype])


def test_grouped_first_convolution_and_same_padding_match_single_explanations():
    dtype = torch.float64
    model = small_vgg(seed=19, dtype=dtype)
    model.features[0] = nn.Conv2d(3, 6, 3, padding='same', groups=3)
    model.features[2] = nn.Conv2d(6, 4, 3, padding='same')
    model.features[5] = nn.Conv2d(4, 6, 5, padding='same', groups=2)
    for index in (0, 2, 5):
        nn.init.normal_(model.features[index].bias, 0., .05)
    model = model.to(dtype).eval()
    assert_grid_matches(model, random_images(dtype, seed=20), TARGETS, [.25], [0., .25], TOLERANCE[dtype])


@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-10), (torch.float32, 1e-2)])
def test_zero_bias_matches_single_explanations(dtype, tolerance):
    # Without the bias an LRP-γ denominator Wx + γW⁺x can cancel to ~0 where the real output Wx + b is positive (the
    # sign of the real output picks the term): float32 then agrees only to ~1e-3 between any two ways of computing
    # it, Zennit's included, so float32 is held to 1e-2 here and float64 to the usual 1e-10.
    model = small_vgg(seed=5, dtype=dtype)
    assert_grid_matches(model, random_images(dtype, seed=6), TARGETS, [0., .5], [0., .25], tolerance, zero_bias=True)


def test_signed_inputs_and_negative_outputs_match():
    # LeakyReLU passes negative values on: the γ layers get signed inputs and relevance on negative outputs, so every
    # term of the generalised LRP-γ is used
    dtype = torch.float64
    model = small_vgg(seed=7, dtype=dtype, activation=lambda: nn.LeakyReLU(.2))
    assert_grid_matches(model, random_images(dtype, seed=8), TARGETS, [.25], [0., .25], TOLERANCE[dtype])


def test_batchnorm_model_matches_single_explanations():
    dtype = torch.float64
    model = small_vgg(seed=9, dtype=dtype, batch_norm=True)
    parameters = {name: value.clone() for name, value in model.state_dict().items()}
    assert_grid_matches(model, random_images(dtype, seed=10), TARGETS, [0., .25], [.25], TOLERANCE[dtype])
    # the engine merged the BatchNorms into a copy; the model itself is unchanged
    assert all(torch.equal(value, parameters[name]) for name, value in model.state_dict().items())


def test_iter_relevance_yields_every_setting_of_relevance_in_any_chunking():
    model = small_vgg(seed=11)
    images = random_images(torch.float32, seed=12)
    epsilons, gammas = [0., .1, .5], [0., .25]
    expected = SweepEngine(model, epsilons, gammas).relevance(images, TARGETS)
    seen = []
    for eps_index, gamma_index, relevance in SweepEngine(model, epsilons, gammas, settings_chunk=2).iter_relevance(
        images, TARGETS
    ):
        seen.append((eps_index, gamma_index))
        assert torch.allclose(relevance, expected[eps_index, gamma_index], rtol=1e-5, atol=1e-7)
    assert seen == [(eps_index, gamma_index) for gamma_index in range(2) for eps_index in range(3)]


def test_epsilon_and_gamma_change_the_relevance():
    # guards the comparisons above against a grid that ignores its parameters
    model = small_vgg(seed=13, dtype=torch.float64)
    relevance = SweepEngine(model, [0., 1.], [0., 1.]).relevance(random_images(torch.float64), TARGETS)
    for first, second in [((0, 0), (1, 0)), ((0, 0), (0, 1))]:
        assert (relevance[first] - relevance[second]).abs().max() > 1e-3 * relevance[first].abs().max()


def test_uncovered_layer_is_refused():
    model = small_vgg()
    model.features[1] = nn.LocalResponseNorm(2)
    with pytest.raises(SweepError, match=r'features\.1 \(LocalResponseNorm\)'):
        SweepEngine(model, [0.], [0.])


def test_batchnorm_the_canonizers_cannot_merge_is_accepted_only_as_a_scaling():
    # a BatchNorm between a ReLU and a max-pool has no affine layer next to it; with fresh statistics it merely scales
    # by 1/sqrt(1 + eps), and the relevance goes through it as Zennit's gradient does; with a shift it is refused
    dtype = torch.float64
    model = small_vgg(seed=14, dtype=dtype)
    batch_norm = nn.BatchNorm2d(4).to(dtype).eval()
    model.features = nn.Sequential(*model.features[:4], batch_norm, *model.features[4:])
    assert_grid_matches(model, random_images(dtype, seed=15), TARGETS, [.25], [.25], TOLERANCE[dtype])
    batch_norm.running_mean.fill_(.5)
    with pytest.raises(SweepError, match=r'BatchNorm features\.4'):
        SweepEngine(model, [0.], [0.])


def test_forward_that_is_not_the_chain_of_leaf_modules_is_refused():
    class Doubling(VGG):
        def forward(self, x):
            return 2 * super().forward(x)

    model = small_vgg()
    model.__class__ = Doubling
    with pytest.raises(SweepError, match='chain of its leaf modules'):
        SweepEngine(model, [0.], [0.]).relevance(random_images(torch.float32), TARGETS)


@pytest.mark.parametrize('arguments, message', [
    (dict(epsilons=[0., -1.]), r'epsilons\[1\] = -1'),
    (dict(gammas=[]), 'gammas is empty'),
    (dict(gammas=['a']), 'gammas must be a sequence of numbers'),
    (dict(settings_chunk=0), 'settings_chunk'),
    (dict(low=1., high=0.), 'low must be < high'),
])
def test_invalid_settings_are_refused(arguments, message):
    with pytest.raises(SweepError, match=message):
        SweepEngine(small_vgg(), **{'epsilons': [0.], 'gammas': [0.], **arguments})


def test_training_mode_and_bad_targets_are_refused():
    model = small_vgg()
    with pytest.raises(SweepError, match='training mode'):
        SweepEngine(model.train(), [0.], [0.])
    engine = SweepEngine(model.eval(), [0.], [0.])
    images = random_images(torch.float32)
    with pytest.raises(SweepError, match=r'lie in \[0, 3\)'):
        engine.relevance(images, torch.tensor([0, 1, 3]))
    with pytest.raises(SweepError, match='LongTensor of 3 class indices'):
        engine.relevance(images, torch.tensor([0., 1., 2.]))
