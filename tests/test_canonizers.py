"""BatchNorm folding canonizers.

The folds are checked against the function they must keep (float64, 1e-10) and against folds written out here by
hand; the relevance of a canonized model against the composite and the independent reference LRP on a copy folded by
hand.
"""
import copy

import pytest
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm

from lrp_brain.canonizers import (
    MergeBatchNormIntoNext, MergeBatchNormIntoPrevious, batch_norm_affine,
)
from lrp_brain.check import check_model
from lrp_brain.composites import VGGComposite
from batchnorm_models import images, randomize, small_vgg, state
from reference_lrp import reference_lrp

pytestmark = pytest.mark.zennit_both

EXACT = 1e-10
EXACT_CANONIZERS = (MergeBatchNormIntoPrevious, MergeBatchNormIntoNext)


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def post_relu_batch_norm_head(model):
    """Replace the classifier by ``Linear → ReLU → BatchNorm1d → Dropout → Linear → ReLU → Linear`` (a
    Keras-converted head)."""
    features = model.classifier[0].in_features
    model.classifier = nn.Sequential(
        nn.Linear(features, 24), nn.ReLU(inplace=True), nn.BatchNorm1d(24), nn.Dropout(),
        nn.Linear(24, 16), nn.ReLU(inplace=True), nn.Linear(16, 3),
    )
    return randomize(model, seed=1).double().eval()


def fold_head_by_hand(model):
    """A copy of a :func:`post_relu_batch_norm_head` model with the BatchNorm folded into the next Linear by hand:
    ``W' = W·diag(g/√(v+e))``, ``b' = b + W·(β - m·g/√(v+e))``."""
    folded = copy.deepcopy(model)
    norm, linear = folded.classifier[2], folded.classifier[4]
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    with torch.no_grad():
        linear.bias += linear.weight @ shift
        linear.weight *= scale[None, :]
    folded.classifier[2] = nn.Identity()
    return folded


def apply(canonizers, model):
    instances = []
    for canonizer in canonizers:
        instances += canonizer.apply(model)
    return instances


def remove(instances):
    for instance in instances:
        instance.remove()


def assert_same_state(model, saved, modules):
    current = model.state_dict()
    assert current.keys() == saved.keys()
    assert all(torch.equal(current[key], saved[key]) for key in saved)
    assert [(name, module) for name, module in model.named_modules()] == modules


# --- the canonizers ---------------------------------------------------------------------------------------------

def test_vgg16_bn_fold_keeps_output_and_is_undone():
    torch.manual_seed(0)
    model = torchvision.models.vgg16_bn(weights=None, num_classes=3)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 3))  # the BatchNorms are in the features; a light head
    model = randomize(model).double().eval()
    input = images()
    expected, saved, modules = model(input), state(model), list(model.named_modules())
    conv, norm = copy.deepcopy(model.features[0]), copy.deepcopy(model.features[1])

    instances = apply([canonizer() for canonizer in EXACT_CANONIZERS], model)
    assert len(instances) == 13
    assert sum(isinstance(module, nn.BatchNorm2d) for module in model.modules()) == 0
    assert relative_error(model(input), expected) < EXACT
    # the first fold, written out: W' = diag(s)·W, b' = s·(b - m) + β with s = g / √(v + e)
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(model.features[0].weight, conv.weight * scale[:, None, None, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(model.features[0].bias, (conv.bias - norm.running_mean) * scale + norm.bias,
                               rtol=1e-14, atol=1e-16)

    remove(instances)
    assert_same_state(model, saved, modules)
    assert torch.equal(model(input), expected)


def test_zennit_merge_and_fold_into_next_share_a_linear_and_are_undone():
    """``ReLU → BN → Linear → BN``: the Linear is folded twice; undoing in Zennit's order (first applied, first
    removed) and in reverse must both give back the original."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2),
    )).double().eval()
    input = torch.randn(7, 6, dtype=torch.float64)
    expected, saved, modules = model(input), state(model), list(model.named_modules())
    for previous in (SequentialMergeBatchNorm, MergeBatchNormIntoPrevious):
        # Zennit 0.5.1's merge leaves the emptied BatchNorm dividing by √(1 + eps)
        tolerance = EXACT if previous is MergeBatchNormIntoPrevious else 1e-4
        for order in (1, -1):
            for reverse_removal in (False, True):
                instances = apply([previous(), MergeBatchNormIntoNext()][::order], model)
                assert len(instances) == 2
                assert not any(isinstance(module, nn.BatchNorm1d) and module.running_var[0] != 1
                               for module in model.modules())
                assert relative_error(model(input), expected) < tolerance
                remove(instances[::-1] if reverse_removal else instances)
                assert_same_state(model, saved, modules)
    assert torch.equal(model(input), expected)


def test_fold_into_next_after_flatten_and_into_unpadded_convolutions():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.ReLU(),
        nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1, padding_mode='replicate'), nn.ReLU(),
        nn.BatchNorm2d(6), nn.Flatten(), nn.Dropout(), nn.Linear(6 * 6 * 6, 3),
    )).double().eval()
    input = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    expected = model(input)
    instances = MergeBatchNormIntoNext().apply(model)
    assert len(instances) == 3
    assert not any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    assert relative_error(model(input), expected) < EXACT
    remove(instances)
    assert torch.equal(model(input), expected)


def test_no_fold_into_zero_padded_convolution():
    """A zero-padded border would need the padding value -t/s after folding: the BatchNorm is left alone."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    assert MergeBatchNormIntoNext().apply(model) == []


def test_batch_norm_affine_is_the_evaluation_mode_map():
    norm = randomize(nn.BatchNorm2d(5)).double().eval()
    input = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    scale, shift = batch_norm_affine(norm)
    torch.testing.assert_close(scale[:, None, None] * input + shift[:, None, None], norm(input), rtol=1e-14,
                               atol=1e-15)


# --- the post-ReLU BatchNorm head -------------------------------------------------------------------------------

def test_post_relu_batch_norm_head_is_found_and_folded():
    model = post_relu_batch_norm_head(small_vgg())
    input = images()
    expected = model(input)

    instances = MergeBatchNormIntoNext().apply(model)
    assert len(instances) == 1
    assert isinstance(model.classifier[2], nn.Identity)
    assert relative_error(model(input), expected) < EXACT
    remove(instances)
    assert isinstance(model.classifier[2], nn.BatchNorm1d)

    report = check_model(model, input[:1])
    assert report.ok, report.problems
    assert report.max_rel_diff < EXACT

    unmerged = check_model(model, input[:1], canonizers=[SequentialMergeBatchNorm()])
    assert not unmerged.ok
    assert any('classifier.2 (BatchNorm1d' in problem and 'not merged' in problem for problem in unmerged.problems)


def test_relevance_of_folded_head_equals_hand_folded_copy_and_reference():
    model = post_relu_batch_norm_head(small_vgg())
    folded = fold_head_by_hand(model)
    input = images(batch=1)
    for target in range(3):
        attr_output = torch.eye(3, dtype=torch.float64)[[target]]
        with Gradient(model, VGGComposite(low=0., high=1.)) as attributor:
            _, relevance = attributor(input.clone(), attr_output)
        with Gradient(folded, VGGComposite(low=0., high=1.)) as attributor:
            _, expected = attributor(input.clone(), attr_output)
        assert relative_error(relevance, expected) < EXACT
        _, reference = reference_lrp(folded, input, attr_output=attr_output)
        assert relative_error(relevance, reference) < 1e-6
