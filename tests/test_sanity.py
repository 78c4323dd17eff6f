"""Sanity checks against answers known without them: scipy's rank correlation, hand cases of the similarity measures
and of class sensitivity, the layer structure of VGG, and the behaviour of maps of a randomised model."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from skimage.metrics import structural_similarity
from torch import nn

from lrp_brain.model import build_model, load_demo_model
from lrp_brain.sanity import (
    SanityError, average_ranks, class_sensitivity, layer_groups, map_similarity, randomisation_test,
    randomised_models, spearman,
)
from test_faithfulness import phantom_batch

pytestmark = pytest.mark.usefixtures('single_threaded')


def test_spearman_matches_scipy_with_and_without_ties():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 300, generator=generator, dtype=torch.float64)
    b = a + torch.randn(4, 300, generator=generator, dtype=torch.float64)
    tied_a, tied_b = a.round(), (b * 2).round().clamp(min=0)  # many ties, a block of zeros
    for first, second in [(a, b), (tied_a, tied_b)]:
        expected = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(first.numpy(), second.numpy())]
        np.testing.assert_allclose(spearman(first, second).numpy(), expected, rtol=1e-12)
    expected_ranks = np.stack([scipy.stats.rankdata(row) - 1 for row in tied_b.numpy()])
    np.testing.assert_array_equal(average_ranks(tied_b).numpy(), expected_ranks)
    assert math.isnan(spearman(torch.ones(1, 5), torch.arange(5.)[None]).item())


def test_map_similarity_hand_cases():
    maps = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    same = map_similarity(maps, maps)
    for values in same.values():
        torch.testing.assert_close(values, torch.ones(3, dtype=torch.float64))
    flipped = map_similarity(maps, -5 * maps)  # the sign reverses every rank; |map| and its scaled SSIM do not move
    torch.testing.assert_close(flipped['spearman'], -torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(flipped['spearman_abs'], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(flipped['ssim'], torch.ones(3, dtype=torch.float64))
    other = torch.randn(3, 16, 16, dtype=torch.float64)
    summed = maps.sum(1).numpy()
    expected = [structural_similarity(np.abs(a) / np.abs(a).max(), np.abs(b) / np.abs(b).max(), data_range=1.)
                for a, b in zip(summed, other.numpy())]
    np.testing.assert_allclose(map_similarity(maps, other)['ssim'].numpy(), expected, rtol=1e-12)
    small = map_similarity(torch.randn(1, 5, 6), torch.randn(1, 5, 6))  # a 5×5 window
    assert small['ssim'].isfinite().all()
    with pytest.raises(SanityError, match='too small for the SSIM'):
        map_similarity(torch.ones(1, 2, 8), torch.ones(1, 2, 8))
    with pytest.raises(SanityError, match='differ in shape'):
        map_similarity(torch.ones(1, 8, 8), torch.ones(2, 8, 8))
    with pytest.raises(SanityError, match=r'map of image \[1\] contains NaN'):
        map_similarity(torch.ones(2, 8, 8), torch.tensor([1., math.nan]).reshape(2, 1, 1).expand(2, 8, 8))


@pytest.mark.parametrize('arch, convolutions', [('vgg16', [3, 3, 3, 2, 2]), ('vgg11', [2, 2, 2, 1, 1])])
@pytest.mark.parametrize('batch_norm', [False, True])
def test_layer_groups_are_the_classifier_then_the_conv_blocks_from_the_top(arch, convolutions, batch_norm):
    model = build_model(arch, width=4, batch_norm=batch_norm)
    groups = layer_groups(model)
    assert [group.name for group in groups] == ['classifier', 'block5', 'block4', 'block3', 'block2', 'block1']
    modules = dict(model.named_modules())
    assert [type(modules[name]) for name in groups[0].modules] == [nn.Linear] * 3
    for group, count in zip(groups[1:], convolutions):
        kinds = [type(modules[name]) for name in group.modules]
        assert kinds.count(nn.Conv2d) == count
        assert kinds.count(nn.BatchNorm2d) == (count if batch_norm else 0)
    pools = [index for index, module in enumerate(model.features) if isinstance(module, nn.MaxPool2d)]
    block_of = {f'features.{index}': 5 - sum(index > pool for pool in pools) for index in range(len(model.features))}
    for group in groups[1:]:
        assert {f'block{6 - block_of[name]}' for name in group.modules} == {group.name}
    all_named = {name for group in groups for name in group.modules}
    assert all_named == {name for name, module in model.named_modules() if list(module.parameters(recurse=False))}


def test_layer_groups_refuse_what_the_cascade_cannot_randomise():
    class OwnParameter(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.layer = nn.Linear(3, 2)

    with pytest.raises(SanityError, match='OwnParameter.*holds parameters of its own'):
        layer_groups(OwnParameter())
    with pytest.raises(SanityError, match=r'cannot re-initialise 1 \(LayerNorm\)'):
        layer_groups(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))
    assert layer_groups(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))[0].modules == ('0', '2')


def test_cascade_randomises_one_group_more_per_stage_on_a_copy():
    torch.manual_seed(0)
    model = build_model('vgg16', width=4, batch_norm=True).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.bias.normal_()
    original = {key: value.clone() for key, value in model.state_dict().items()}
    groups = layer_groups(model)
    seen = []
    for stage, (group, randomised) in enumerate(randomised_models(model, seed=3), start=1):
        seen.append(group.name)
        state = randomised.state_dict()
        for index, other in enumerate(groups):
            for name in other.modules:
                changed = any(not torch.equal(state[key], original[key])
                              for key in state if key.startswith(name + '.') and key.endswith(('weight', 'mean')))
                assert changed == (index < stage), (stage, name)
    assert seen == [group.name for group in groups]
    assert all(torch.equal(value, original[key]) for key, value in model.state_dict().items())
    *_, (_, first) = randomised_models(model, seed=3)
    *_, (_, again) = randomised_models(model, seed=3)
    *_, (_, other) = randomised_models(model, seed=4)
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in first.state_dict().items())
    assert not torch.equal(first.features[0].weight, other.features[0].weight)
    batch_norm = first.features[1]
    assert torch.equal(batch_norm.running_mean, torch.zeros(4)) and torch.equal(batch_norm.weight, torch.ones(4))
    assert torch.equal(first.features[0].bias, torch.zeros(4))
    # torchvision's VGG initialisation: Kaiming normal with fan-out for the convolutions, N(0, 0.01²) linear layers
    assert first.classifier[0].weight.std().item() == pytest.approx(0.01, rel=0.02)
    conv = first.features[-4]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (conv.out_channels * 9)), rel=0.05)


@pytest.mark.zennit_both
def test_randomisation_test_on_the_demo_model():
    """The fully randomised model's gradient maps (the last stage) are unrelated to the original's in sign: Spearman's
    |ρ| ≤ 0.1 for each of 8 phantoms. Measured on 24: mean 0.002, largest |ρ| 0.045 — the spread of the rank
    correlation of unrelated maps of 64 × 64 pixels (1/√4096 ≈ 0.016, somewhat more for smooth maps). The absolute
    maps keep part of the input's structure (the head against the empty background): measured mean ρ 0.20 for the
    gradient and 0.66 for LRP, the known limit of the test (Binder et al., 2023)."""
    model, _ = load_demo_model()
    images, labels = phantom_batch(8)
    result = randomisation_test(model, images, 'label', labels, epsilon=0.25, gamma=0.1, seed=0)
    assert result.stages == ('original', 'classifier', 'block5', 'block4', 'block3', 'block2', 'block1')
    assert result.methods == ('lrp', 'gradient')
    assert torch.equal(result.targets, labels)
    for measures in result.similarity.values():
        for values in measures.values():
            assert values.shape == (7, 8)
            torch.testing.assert_close(values[0], torch.ones(8, dtype=torch.float64))
    gradient = result.similarity['gradient']
    assert gradient['spearman'][-1].abs().max() <= 0.1
    for method in result.methods:  # randomising everything moves every map away from the original
        for measure in ('spearman_abs', 'ssim'):
            assert result.summary()[method][measure][-1] < 0.8
    exported = result.to_dict()
    assert exported['stages'][0] == 'original' and len(exported['mean']['lrp']['ssim']) == 7
    assert exported['settings'] == {'epsilon': 0.25, 'gamma': 0.1, 'seed': 0,
                                    'contrast': {'lrp': None, 'gradient': None}}
    assert all(torch.equal(value, load_demo_model()[0].state_dict()[key]) for key, value in model.state_dict().items())


def test_randomisation_test_refuses_bad_arguments():
    model = build_model('vgg16', width=4).eval()
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(SanityError, match='distinct attribution methods'):
        randomisation_test(model, images, 0, methods=('gradient', 'gradient'))
    with pytest.raises(SanityError, match='seed must be an integer'):
        randomisation_test(model, images, 0, methods='gradient', seed=0.5)
    with pytest.raises(SanityError, match='LayerNorm'):
        randomisation_test(nn.Sequential(nn.Flatten(), nn.LayerNorm(3 * 32 * 32), nn.Linear(3 * 32 * 32, 2)), images,
                           0, methods='gradient')


class LinearClasses(nn.Module):
    """``f_k(x) = Σ w_k ⊙ x``: its gradient map for class ``k`` is ``w_k``."""
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, images):
        return (images[:, None] * self.weight).sum((2, 3, 4))


def test_class_sensitivity_of_linear_classes_is_the_correlation_of_their_weights():
    weight = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    weight[2] = weight[0]
    images = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    result = class_sensitivity(LinearClasses(weight), images, method='gradient')
    flat = weight.flatten(1).numpy()
    pairs = [scipy.stats.spearmanr(flat[0], flat[1]).statistic, 1., scipy.stats.spearmanr(flat[1], flat[2]).statistic]
    np.testing.assert_allclose(result.mean['spearman'].numpy(), [np.mean(pairs)] * 2, rtol=1e-12)
    np.testing.assert_allclose(result.similarity['spearman'][:, 0, 2].numpy(), [1., 1.], rtol=1e-12)
    torch.testing.assert_close(result.similarity['ssim'], result.similarity['ssim'].transpose(1, 2))
    assert result.to_dict()['settings']['method'] == 'gradient'


@pytest.mark.zennit_both
@pytest.mark.parametrize('method', ['lrp', 'gradient'])
def test_class_sensitivity_of_identical_class_outputs_is_one(method):
    """A head whose every row is the same computes the same function for each class: identical maps, similarity 1."""
    torch.manual_seed(0)
    model = build_model('vgg16', width=4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.normal_(0., 0.05)
        head = model.classifier[-1]
        head.weight.copy_(head.weight[:1].expand_as(head.weight))
        head.bias.fill_(0.1)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = class_sensitivity(model, images, method=method)
    for measure in ('spearman', 'spearman_abs', 'ssim'):
        torch.testing.assert_close(result.mean[measure], torch.ones(3, dtype=torch.float64))
    with pytest.raises(SanityError, match='two classes or more'):
        class_sensitivity(build_model('vgg16', num_classes=1, width=4).eval(), images, method='gradient')
