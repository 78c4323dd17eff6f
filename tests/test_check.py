"""The model check behind ``lrp-brain check`` (:func:`lrp_brain.check.check_model`): what it flags and what it lets
pass, and the command itself."""
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from zennit.canonizers import Canonizer

from lrp_brain import model as model_module
from lrp_brain.canonizers import MergeBatchNormIntoNext, MergeBatchNormIntoPrevious
from lrp_brain.check import check_model, probe_input
from lrp_brain.cli import main
from lrp_brain.model import save_checkpoint, vgg16_small
from batchnorm_models import images, randomize, small_vgg, state

pytestmark = pytest.mark.zennit_both

EXACT = 1e-10
EXACT_CANONIZERS = (MergeBatchNormIntoPrevious, MergeBatchNormIntoNext)


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
