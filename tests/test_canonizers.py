"""BatchNorm folding canonizers and :func:`lrp_brain.canonizers.check_model` (``lrp-brain check``).

The folds are checked against the function they must keep (float64, 1e-10) and against folds written out here by
hand; the relevance of a canonized model against the composite and the independent reference LRP on a copy folded by
hand.
"""
import copy

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm

from lrp_brain import model as model_module
from lrp_brain.canonizers import (
    MergeBatchNormIntoNext, MergeBatchNormIntoPrevious, batch_norm_affine, check_model, probe_input,
)
from lrp_brain.cli import main
from lrp_brain.composites import VGGComposite
from lrp_brain.model import save_checkpoint, vgg16_small
from reference_lrp import reference_lrp

pytestmark = pytest.mark.zennit_both

EXACT = 1e-10
EXACT_CANONIZERS = (MergeBatchNormIntoPrevious, MergeBatchNormIntoNext)


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def randomize(model, seed=0):
    """Give every BatchNorm random statistics and affine parameters and every bias a random value, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(.5, 1.5, generator=generator)
                module.bias.normal_(0., .2, generator=generator)
                module.running_mean.normal_(0., .3, generator=generator)
                module.running_var.uniform_(.5, 2., generator=generator)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.normal_(0., .05, generator=generator)
    return model


def small_vgg(batch_norm=False, seed=0):
    torch.manual_seed(seed)
    return randomize(vgg16_small(width=4, num_classes=3, batch_norm=batch_norm), seed).double().eval()


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


def images(batch=2, size=32, seed=3):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def apply(canonizers, model):
    instances = []
    for canonizer in canonizers:
        instances += canonizer.apply(model)
    return instances


def remove(instances):
    for instance in instances:
        instance.remove()


def state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


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
        with Gradient(model, VGGComposite()) as attributor:
            _, relevance = attributor(input.clone(), attr_output)
        with Gradient(folded, VGGComposite()) as attributor:
            _, expected = attributor(input.clone(), attr_output)
        assert relative_error(relevance, expected) < EXACT
        _, reference = reference_lrp(folded, input, attr_output=attr_output)
        assert relative_error(relevance, reference) < 1e-6


# --- check_model --------------------------------------------------------------------------------------------------

class Twice(nn.Module):
    """A module no rule covers."""
    def forward(self, input):
        return 2 * input


def test_vgg16_bn_passes_with_exact_canonizers_and_caller_model_untouched():
    model = randomize(vgg16_small(width=4, batch_norm=True)).eval()
    saved = state(model)
    report = check_model(model, images(), canonizers=[canonizer() for canonizer in EXACT_CANONIZERS])
    assert report.ok, report.problems
    assert report.max_rel_diff < EXACT and report.restored
    assert all(value.dtype == torch.float32 for value in model.state_dict().values() if value.is_floating_point())
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    text = str(report)
    assert 'OK: safe to explain' in text and 'conv1_1' in text and 'z^B' in text


def test_uncovered_layer_is_flagged():
    model = small_vgg()
    model.features.insert(2, Twice())
    report = check_model(model, images(batch=1))
    assert not report.ok
    assert [row.name for row in report.rows if row.group == 'uncovered'] == ['features.2']
    assert any(problem.startswith('features.2 (Twice) has no rule') for problem in report.problems)
    assert 'NOT SAFE TO EXPLAIN' in str(report)


def test_reused_module_is_flagged():
    model = small_vgg()
    model.features[3] = model.features[1]
    report = check_model(model, images(batch=1))
    assert not report.ok
    assert any('features.1, features.3' in problem for problem in report.problems)


def test_unmerged_batch_norm_before_zero_padded_convolution_is_flagged():
    model = small_vgg()
    model.features.insert(2, nn.BatchNorm2d(model.features[0].out_channels))
    randomize(model).double().eval()
    report = check_model(model, images(batch=1))
    assert not report.ok
    assert any(problem.startswith('features.2 (BatchNorm2d, between ReLU and Conv2d) is not merged')
               for problem in report.problems)


class ScaleFirstConvolution(Canonizer):
    """A faulty canonizer for the tests: multiplies the first convolution's weight by ``factor`` and, if
    ``restore``, puts the original weight back on removal."""
    def __init__(self, factor, restore):
        self.factor, self.restore = factor, restore
        self.module = self.weight = None

    def apply(self, root_module):
        instance = self.copy()
        instance.register(root_module.features[0])
        return [instance]

    def register(self, module):
        self.module, self.weight = module, module.weight
        module.weight = nn.Parameter(module.weight * self.factor)

    def remove(self):
        if self.restore:
            self.module.weight = self.weight

    def copy(self):
        return ScaleFirstConvolution(self.factor, self.restore)


def test_canonizer_changing_the_output_is_flagged():
    report = check_model(small_vgg(), images(), canonizers=[ScaleFirstConvolution(1 + 1e-4, restore=True)])
    assert report.restored
    assert 1e-8 < report.max_rel_diff < 1e-3
    assert any(problem.startswith('the canonizers change the output') for problem in report.problems)


def test_canonizer_not_restoring_is_flagged():
    report = check_model(small_vgg(), images(), canonizers=[ScaleFirstConvolution(1., restore=False)])
    assert report.max_rel_diff == 0 and not report.restored
    assert any('does not restore' in problem and 'features.0.weight' in problem for problem in report.problems)


def test_conservation_is_exact_for_lrp_0_without_biases():
    """Without biases, LRP-0 (ε = γ = 0), Pass, winner-takes-all, Norm and z^B all conserve but for the stabiliser
    1e-6 (~6e-6 of this logit per layer): every group boundary must carry the logit. The plain gradient at the same
    places would not."""
    model = small_vgg()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.zero_()
                module.weight.normal_(0., (2. / module.weight[0].numel()) ** .5)
    report = check_model(model, images(batch=1), epsilon=0., gamma=0.)
    assert report.ok, report.problems
    names = [row.name for row in report.conservation]
    assert names == ['input', 'features.5', 'features.10', 'features.17', 'features.24', 'avgpool', 'classifier.0',
                     'classifier.3', 'classifier.6', 'output']
    for row in report.conservation:
        assert row.ratio == pytest.approx(1., abs=1e-4), row


def test_probe_input_lies_between_the_bounds():
    low = torch.tensor([-1., 0., 2.]).reshape(1, 3, 1, 1)
    input = probe_input(16, low, low + .5, seed=4)
    assert input.shape == (1, 3, 16, 16) and input.dtype == torch.float64
    assert ((input >= low) & (input <= low + .5)).all()
    assert torch.equal(input, probe_input(16, low, low + .5, seed=4))


# --- lrp-brain check ----------------------------------------------------------------------------------------------

def test_cli_check_passes_on_torchvision_vgg16():
    result = CliRunner().invoke(main, ['check', '--arch', 'vgg16', '--size', '32'])
    assert result.exit_code == 0, result.output
    assert 'OK: safe to explain' in result.output and 'classifier.6' in result.output
    assert '15 in-place modules (ReLU): the relevance is the same with inplace=False' in result.output


def test_cli_check_passes_on_a_checkpoint(tmp_path):
    path = tmp_path / 'small.pt'
    save_checkpoint(path, randomize(vgg16_small(width=4)), {'input_size': 32})
    result = CliRunner().invoke(main, ['check', '--checkpoint', str(path), '--eps', '0.5'])
    assert result.exit_code == 0, result.output
    assert 'LRP-ε (ε=0.5)' in result.output and '32×32' in result.output


def test_cli_check_without_demo_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, 'DEMO_MODEL_PATH', tmp_path / 'absent.pt')
    result = CliRunner().invoke(main, ['check'])
    assert result.exit_code == 1
    assert 'absent.pt' in result.output and 'lrp-brain train' in result.output
