"""Class-contrastive output relevance (SGLRP, CLRP): the vectors by hand, the maps against the float64 reference LRP
started from the same vector, the sweep engine against the composite, a network whose classes use disjoint regions,
two classes and one, and saturated predictions."""
import json
import math
import re

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from scipy.stats import spearmanr
from torch import nn
from torchvision.models.vgg import VGG
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox

from lrp_brain.cli import main
from lrp_brain.contrast import (ContrastError, attr_output, check_contrast, contrastive, input_relevance, one_hot,
                                output_relevance, smallest_factor, softmax_gradient)
from lrp_brain.data import Transform, find_slices, read_slice
from lrp_brain.evaluate import evaluate
from lrp_brain.explain import explain, explain_all_classes
from lrp_brain.faithfulness import DEFAULTS, morf_lerf
from lrp_brain.model import default_meta, load_checkpoint, save_checkpoint, vgg16_small
from lrp_brain.phantom import write_phantoms
from lrp_brain.sanity import class_sensitivity
from lrp_brain.sources import open_source
from lrp_brain.sweep import run_sweep
from lrp_brain.sweep_engine import SweepEngine, SweepError

from command_setup import write_setup
from reference_lrp import randomize_biases_and_statistics, random_vgg, reference_lrp

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

TOLERANCE = 1e-6


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def bounded_input(batch, size, seed=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def numpy_sglrp(logits, target):
    """``p_t (δ_tn − p_n)`` straight from the formula, NumPy float64, with ``1 − p_t`` written ``Σ_{n≠t} p_n`` (a
    float64 ``1 − p_t`` keeps only ~3 digits at p_t = 1 − 2e-13)."""
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    relevance = -p[target] * p
    relevance[target] = p[target] * np.delete(p, target).sum()
    return relevance


# --- the vectors ---------------------------------------------------------------------------------------------------

def test_vectors_by_hand():
    logits = torch.tensor([[2., 0., 1.], [0., 3., -1.]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    assert one_hot(logits, targets).tolist() == [[1., 0., 0.], [0., 1., 0.]]
    assert contrastive(logits, targets).tolist() == [[1., -.5, -.5], [-.5, 1., -.5]]
    for row, target in enumerate(targets.tolist()):
        expected = numpy_sglrp(logits[row], target)
        unnormalised = softmax_gradient(logits, targets, normalise=False)[row].numpy()
        np.testing.assert_allclose(unnormalised, expected, rtol=1e-12, atol=0)
        # normalised: divided by p_t (1 − p_t), i.e. e_t minus the softmax of the other logits
        factor = expected[target]
        np.testing.assert_allclose(softmax_gradient(logits, targets)[row].numpy(), expected / factor, rtol=1e-12)
    others = np.exp([0., 1.]) / np.exp([0., 1.]).sum()
    np.testing.assert_allclose(softmax_gradient(logits, targets)[0].numpy(), [1., -others[0], -others[1]], rtol=1e-12)
    assert output_relevance(logits, 2, 'clrp').tolist() == [[-.5, -.5, 1.], [-.5, -.5, 1.]]
    # every contrastive vector sums to 0 over the classes
    for contrast in ('sglrp', 'clrp'):
        assert output_relevance(logits, targets, contrast).sum(1).abs().max() < 1e-15


def test_two_classes_contrast_the_other_class_and_one_class_is_refused():
    logits = torch.tensor([[5., -2.]])
    for contrast in ('sglrp', 'clrp'):
        assert output_relevance(logits, 0, contrast).tolist() == [[1., -1.]]
        assert output_relevance(logits, 1, contrast).tolist() == [[-1., 1.]]
        with pytest.raises(ContrastError, match='nothing to contrast'):
            output_relevance(torch.tensor([[5.]]), 0, contrast)
        with pytest.raises(ContrastError, match='nothing to contrast'):
            check_contrast(contrast, 'lrp', classes=1)
    assert check_contrast('none', 'lrp', classes=1) is None


def test_check_contrast_refuses_unknown_names_and_clrp_on_the_gradient():
    with pytest.raises(ContrastError, match='one of none, sglrp, clrp'):
        check_contrast('softmax')
    with pytest.raises(ContrastError, match="'gradient' does not take contrast 'clrp'"):
        check_contrast('clrp', 'gradient')
    assert check_contrast('sglrp', 'gradient') == 'sglrp'
    assert check_contrast('CLRP'.lower(), 'gradxinput') == 'clrp'


def test_saturated_predictions():
    """float32's own softmax loses 1 − p_t at a logit gap of 30 (the demo model's trap): the target's entry of
    p_t (δ − p) is exactly 0, the others ~1e-13, so the map is ~0 and explains the other classes only. The
    normalised vector is exact however large the gap; the unnormalised one is kept where p_t (1 − p_t) is at least
    smallest_factor(dtype) and refused with the reason below it."""
    logits = torch.tensor([[0., 30., 0.]])
    naive = logits.softmax(1)[0, 1] * (torch.eye(3)[1] - logits.softmax(1)[0])
    assert naive[1] == 0 and naive.abs().max() < 1e-12
    # the gap of 30 in float64: factor 2 e^-30 ≈ 1.9e-13, above float32's 1.1e-19: kept, and non-zero
    kept = softmax_gradient(logits, 1, normalise=False)
    np.testing.assert_allclose(kept[0].numpy(), numpy_sglrp([0., 30., 0.], 1), rtol=1e-6)
    assert kept.dtype == torch.float32 and bool((kept != 0).all())
    for gap in (30., 50., 800., 1e6):
        saturated = torch.tensor([[0., gap, 0.]])
        assert softmax_gradient(saturated, 1).tolist() == [[-.5, 1., -.5]]
        # a non-target class of a saturated prediction: e_t minus (almost) the predicted class
        np.testing.assert_allclose(softmax_gradient(saturated, 0)[0].numpy(), [1., -1., -math.exp(-gap)],
                                   rtol=1e-6, atol=1e-30)
    assert smallest_factor(torch.float32) == pytest.approx(1.0842e-19, rel=1e-4)
    with pytest.raises(ContrastError, match=r'SGLRP of image 0 \(of \[0\]\) is saturated.*normalise=True'):
        softmax_gradient(torch.tensor([[0., 50., 0.]]), 1, normalise=False)
    # float64 logits have more room: the gap of 50 is kept there, 800 (p_t (1 − p_t) underflows to 0) is refused
    assert bool((softmax_gradient(torch.tensor([[0., 50., 0.]], dtype=torch.float64), 1, normalise=False) != 0).all())
    with pytest.raises(ContrastError, match='saturated'):
        softmax_gradient(torch.tensor([[0., 800., 0.]], dtype=torch.float64), 1, normalise=False)


# --- the maps against the reference ----------------------------------------------------------------------------------

def reference_contrast(model, images, targets, contrast, **kwargs):
    """The reference LRP from the contrast's output relevance (computed from the reference's own float64 logits),
    with CLRP's positive part."""
    logits, _ = reference_lrp(model, images, targets, **kwargs)
    _, relevance = reference_lrp(model, images, attr_output=output_relevance(logits, targets, contrast), **kwargs)
    return input_relevance(relevance, contrast)


@pytest.fixture(scope='module')
def small_vgg16():
    return random_vgg(seed=3)


@pytest.mark.parametrize('contrast', ['sglrp', 'clrp'])
@pytest.mark.parametrize('epsilon, gamma', [(0.25, 0.1), (1., 0.)])
def test_explain_with_contrast_matches_the_reference(small_vgg16, contrast, epsilon, gamma):
    images, targets = bounded_input(3, 32), torch.tensor([0, 2, 1])
    expected = reference_contrast(small_vgg16, images, targets, contrast, epsilon=epsilon, gamma=gamma)
    relevance = explain(small_vgg16, images, target=targets, epsilon=epsilon, gamma=gamma, contrast=contrast).relevance
    assert expected.abs().max() > 0
    assert relative_error(relevance, expected) <= TOLERANCE
    if contrast == 'clrp':
        assert relevance.min() >= 0 and (relevance == 0).any()


def test_contrastive_maps_differ_from_the_plain_map(small_vgg16):
    images, targets = bounded_input(2, 32), torch.tensor([0, 1])
    plain = explain(small_vgg16, images, target=targets).relevance
    for contrast in ('sglrp', 'clrp'):
        assert relative_error(explain(small_vgg16, images, target=targets, contrast=contrast).relevance, plain) > .1


@pytest.fixture(scope='module')
def torchvision_vgg16():
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None, num_classes=3)
    return randomize_biases_and_statistics(model, torch.Generator().manual_seed(0)).double().eval()


@pytest.mark.parametrize('contrast', ['sglrp', 'clrp'])
def test_torchvision_vgg16_at_32_pixels_matches_the_reference(torchvision_vgg16, contrast):
    images, targets = bounded_input(2, 32, seed=4), torch.tensor([1, 2])
    expected = reference_contrast(torchvision_vgg16, images, targets, contrast)
    relevance = explain(torchvision_vgg16, images, target=targets, contrast=contrast).relevance
    assert expected.abs().max() > 0
    assert relative_error(relevance, expected) <= TOLERANCE


def test_zennit_users_pass_attr_output(small_vgg16):
    """The helper as a plain Zennit Gradient's attr_output, here with Zennit's stock EpsilonGammaBox, equals
    explain(method='zennit-egb', contrast=...)."""
    images, targets = bounded_input(2, 32, seed=5), torch.tensor([2, 0])
    for contrast in ('sglrp', 'clrp'):
        with Gradient(small_vgg16, EpsilonGammaBox(low=0., high=1.)) as attributor:
            _, relevance = attributor(images.clone().requires_grad_(True), attr_output(targets, contrast))
        relevance = input_relevance(relevance, contrast)
        ours = explain(small_vgg16, images, target=targets, method='zennit-egb', contrast=contrast,
                       composite_kwargs={'canonizers': []}).relevance
        assert relative_error(ours, relevance) < 1e-12


def test_gradient_with_sglrp_is_the_gradient_of_the_probability(small_vgg16):
    images, targets = bounded_input(2, 32, seed=6), torch.tensor([1, 0])
    relevance = explain(small_vgg16, images, target=targets, method='gradient', contrast='sglrp').relevance
    inputs = images.clone().requires_grad_(True)
    probabilities = small_vgg16(inputs).softmax(1)
    target_probability = probabilities.gather(1, targets[:, None])
    gradient, = torch.autograd.grad(target_probability.sum(), inputs)
    factor = (target_probability * (1 - target_probability)).detach().reshape(-1, 1, 1, 1)
    assert relative_error(relevance, gradient / factor) < 1e-9
    with pytest.raises(ContrastError, match='gradient'):
        explain(small_vgg16, images, target=targets, method='gradient', contrast='clrp')
    gradxinput = explain(small_vgg16, images, target=targets, method='gradxinput', contrast='clrp').relevance
    assert gradxinput.min() >= 0


def test_saturated_model_gives_the_normalised_map():
    """A logit gap beyond float64's exp range: p_t (1 − p_t) is 0 even in float64, the map is the normalised one."""
    model = random_vgg(seed=3)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(1e5)
        model.classifier[-1].bias.mul_(1e5)
    images = bounded_input(2, 32)
    with torch.no_grad():
        logits = model(images)
    top2 = logits.topk(2, dim=1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > 800).all())
    targets = logits.argmax(1)
    expected = reference_contrast(model, images, targets, 'sglrp')
    relevance = explain(model, images, target=targets, contrast='sglrp').relevance
    assert expected.abs().max() > 0 and relative_error(relevance, expected) <= TOLERANCE
    with pytest.raises(ContrastError, match='saturated'):
        softmax_gradient(logits, targets, normalise=False)


def test_one_class_model_is_refused():
    model = random_vgg(num_classes=1)
    images = bounded_input(1, 32)
    for contrast in ('sglrp', 'clrp'):
        with pytest.raises(ContrastError, match='nothing to contrast'):
            explain(model, images, target=0, contrast=contrast)
        with pytest.raises(SweepError, match='nothing to contrast'):
            SweepEngine(model, [0.25], [0.1], 0., 1., contrast=contrast).relevance(images, torch.tensor([0]))
    assert explain(model, images, target=0).relevance.abs().max() > 0


# --- the sweep engine -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('contrast', [None, 'sglrp', 'clrp'])
def test_sweep_engine_equals_the_composite_with_contrast(small_vgg16, contrast):
    epsilons, gammas = [0., 0.25, 1.], [0., 0.1, 0.5]
    images, targets = bounded_input(2, 32, seed=7), torch.tensor([2, 1])
    engine = SweepEngine(small_vgg16, epsilons, gammas, 0., 1., contrast=contrast)
    grid = engine.relevance(images, targets)
    for i, epsilon in enumerate(epsilons):
        for j, gamma in enumerate(gammas):
            expected = explain(small_vgg16, images, target=targets, epsilon=epsilon, gamma=gamma,
                               contrast=contrast).relevance
            assert relative_error(grid[i, j], expected) <= TOLERANCE, (epsilon, gamma)


def test_sweep_engine_refuses_an_unknown_contrast(small_vgg16):
    with pytest.raises(SweepError, match='contrast must be one of'):
        SweepEngine(small_vgg16, [0.25], [0.1], 0., 1., contrast='dual')


# --- a network whose two classes use disjoint regions ---------------------------------------------------------------

def two_region_network():
    """VGG-shaped: one 1×1 convolution (the channel mean, then ReLU), average pooling to the top and bottom half
    (``a``, ``b``), hidden units ``a + b``, ``a``, ``b``, and logits ``f_0 = 10 (a + b) + a``, ``f_1 = 10 (a + b) +
    b``: both classes rest mostly on the shared unit, class 0 alone on the top, class 1 alone on the bottom."""
    with torch.device('meta'):
        model = VGG(nn.Sequential(), num_classes=2, init_weights=False)
    model.features = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU())
    model.avgpool = nn.AdaptiveAvgPool2d((2, 1))
    model.classifier = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model.features[0].weight.fill_(1 / 3)
        model.features[0].bias.zero_()
        model.classifier[0].weight.copy_(torch.tensor([[1., 1.], [1., 0.], [0., 1.]]))
        model.classifier[0].bias.zero_()
        model.classifier[2].weight.copy_(torch.tensor([[10., 1., 0.], [10., 0., 1.]]))
        model.classifier[2].bias.zero_()
    return model.double().eval()


def test_contrastive_maps_separate_the_classes_the_plain_maps_do_not():
    model = two_region_network()
    half = torch.rand(1, 3, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * .9 + .1
    image = torch.cat([half, half], dim=2)  # the same content on top and bottom: a = b
    top = torch.zeros(8, 8, dtype=torch.bool)
    top[:4] = True
    regions = {0: top, 1: ~top}

    def share_on_own_region(maps):
        return [float(maps[k].sum(0)[regions[k]].sum() / maps[k].sum()) for k in (0, 1)]

    plain = explain(model, image.repeat(2, 1, 1, 1), target=torch.tensor([0, 1])).relevance
    assert plain.min() >= 0
    # by hand: 10/21 of each class's relevance reaches each half through the shared unit, 1/21 its own half alone
    np.testing.assert_allclose(share_on_own_region(plain), [11 / 21, 11 / 21], rtol=1e-6)  # stabilisers: 1e-6
    clrp = explain(model, image.repeat(2, 1, 1, 1), target=torch.tensor([0, 1]), contrast='clrp').relevance
    sglrp = explain(model, image.repeat(2, 1, 1, 1), target=torch.tensor([0, 1]), contrast='sglrp').relevance
    for k in (0, 1):
        own, other = clrp[k].sum(0)[regions[k]], clrp[k].sum(0)[regions[1 - k]]
        assert bool((own > 0).all()) and bool((other == 0).all())
        # two classes: SGLRP's vector is e_t − e_other, CLRP's before its positive part
        assert torch.allclose(sglrp[k].clamp(min=0), clrp[k], rtol=1e-12, atol=0)
        assert bool((sglrp[k].sum(0)[regions[1 - k]] < 0).all())
    assert share_on_own_region(clrp) == [1., 1.]
    sensitivity = {contrast: class_sensitivity(model, image, low=0., high=1., contrast=contrast).mean['spearman']
                   for contrast in (None, 'sglrp')}
    assert sensitivity[None].item() > .9 and sensitivity['sglrp'].item() == pytest.approx(-1.)


# --- the command line ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def cli_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('contrast_cli')
    write_phantoms(folder / 'phantoms', 4, seed=4, sizes=(64,), quiet=True)
    torch.manual_seed(0)
    meta = {**default_meta('vgg16', 4), 'transform': Transform(size=32).to_dict(), 'input_size': 32}
    save_checkpoint(folder / 'model.pt', vgg16_small(width=4), meta)
    return folder


def explain_command(*arguments):
    return CliRunner().invoke(main, ['explain', '--quiet', '--device', 'cpu', *map(str, arguments)])


@pytest.mark.parametrize('contrast', ['none', 'sglrp', 'clrp'])
def test_explain_target_all_with_contrast_draws_and_measures_the_contrastive_maps(cli_setup, contrast):
    path = find_slices(cli_setup / 'phantoms')[0]
    out = cli_setup / f'out_{contrast}'
    result = explain_command(path, '--checkpoint', cli_setup / 'model.pt', '--out', out, '--target', 'all',
                             '--contrast', contrast)
    assert result.exit_code == 0, result.output
    item = read_slice(path)
    image, _ = Transform(size=32)(item.image, item.mask)
    model, _ = load_checkpoint(cli_setup / 'model.pt')
    expected = explain_all_classes(model, image, low=0., high=1., contrast=None if contrast == 'none' else contrast)
    every = np.load(out / '1.mat.classes.npy')
    np.testing.assert_allclose(every, expected.relevance.numpy(), rtol=1e-5, atol=1e-7)
    assert (out / '1.mat.classes.png').stat().st_size > 0
    maps = every.sum(axis=1).reshape(len(every), -1)
    pairs = [(i, j) for i in range(len(maps)) for j in range(i + 1, len(maps))]
    sensitivity = np.mean([spearmanr(maps[i], maps[j])[0] for i, j in pairs])
    printed = re.search(r'class sensitivity \(.*\): (-?\d\.\d+)', result.output)
    assert printed and float(printed.group(1)) == pytest.approx(sensitivity, abs=1e-3)
    assert len(re.findall(r'\d\.\d+', result.output.split("IoU of each class's map:")[1].splitlines()[0])) == 3
    assert (f'{contrast.upper()})' in result.output) == (contrast != 'none')


def test_explain_refuses_clrp_on_the_gradient_in_one_line(cli_setup, tmp_path):
    result = explain_command(find_slices(cli_setup / 'phantoms')[0], '--checkpoint', cli_setup / 'model.pt',
                             '--out', tmp_path, '--method', 'gradient', '--contrast', 'clrp')
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert "method 'gradient' does not take contrast 'clrp'" in result.output
    assert not list(tmp_path.iterdir())


# --- evaluate, sweep and sanity with a contrast ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def split_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('contrast_runs')
    data, checkpoint = write_setup(folder, he_init=True)
    return folder, data, checkpoint


def test_evaluate_and_sweep_score_the_contrastive_maps(split_setup):
    """evaluate(contrast=...) scores the maps explain gives with that contrast, records it, and the sweep (its engine)
    gives the same validation IoU for the same setting."""
    folder, data, checkpoint = split_setup
    source = open_source(checkpoint, data, quiet=True)
    low, high = source.bounds
    rows, summary = evaluate(source, 'val', progress=False, contrast='clrp', perturbation={'steps': 4})
    assert summary['settings']['contrast'] == 'clrp'
    item = source.dataset('val')[0]
    relevance = explain(source.model, item['image'][None], labels=torch.tensor([item['label']]), low=low, high=high,
                        contrast='clrp').relevance
    curves = morf_lerf(source.model, item['image'][None], relevance, torch.tensor([item['label']]),
                       **{**DEFAULTS, 'steps': 4})
    assert rows[0]['faithfulness_gap'] == pytest.approx(float(curves.gap[0]), rel=1e-5, abs=1e-6)
    assert relevance.min() >= 0
    plain, _ = evaluate(source, 'val', progress=False, criteria='localisation')
    assert [row['iou'] for row in rows] != [row['iou'] for row in plain]
    result = run_sweep(source, [0.25], [0.1], progress=False, criteria='localisation', contrast='clrp')
    assert result.table[0]['val_iou'] == pytest.approx(summary['iou']['overall']['mean'], rel=1e-4)
    assert result.choice['grid']['contrast'] == 'clrp'
    with pytest.raises(ContrastError, match="'gradient' does not take contrast 'clrp'"):
        evaluate(source, 'val', method='gradient', contrast='clrp', out=str(folder / 'refused'))
    assert not (folder / 'refused').exists()


def test_sanity_command_with_contrast(split_setup):
    folder, data, checkpoint = split_setup
    out = folder / 'sanity_sglrp'
    result = CliRunner().invoke(main, ['sanity', '--data', data, '--checkpoint', checkpoint, '--count', '3',
                                       '--contrast', 'sglrp', '--quiet', '--device', 'cpu', '--out', str(out)])
    assert result.exit_code == 0, result.output
    assert 'lrp (SGLRP): after randomising' in result.output
    report = json.loads((out / 'sanity.json').read_text())
    assert report['settings']['contrast'] == 'sglrp'
    assert report['randomisation']['settings']['contrast'] == {'lrp': 'sglrp', 'gradient': None}
    source = open_source(checkpoint, data, quiet=True)
    images = torch.stack([source.dataset('test')[index]['image'] for index in range(3)])
    low, high = source.bounds
    expected = class_sensitivity(source.model, images, low=low, high=high, contrast='sglrp').mean['spearman']
    assert report['class_sensitivity']['lrp']['per_image']['spearman'] == pytest.approx(expected.tolist(), abs=1e-9)
    assert report['class_sensitivity']['lrp']['settings']['contrast'] == 'sglrp'
    assert report['class_sensitivity']['gradient']['settings']['contrast'] is None
