"""``lrp-brain explain``: the files it writes hold what :func:`lrp_brain.explain.explain` gives for the same input, the
printed numbers are the right ones, and bad inputs get one clear message."""
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage.io import imsave

from lrp_brain.cli import main
from lrp_brain.data import CLASS_NAMES, Transform, find_slices, read_slice
from lrp_brain.explain_files import parse_target
from lrp_brain.explain import ExplainError, explain
from lrp_brain.model import DEMO_MODEL_PATH, default_meta, load_checkpoint, save_checkpoint, vgg16_small
from lrp_brain.phantom import write_phantoms

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

SIZE = 32


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('explain_cli')
    data = folder / 'phantoms'
    write_phantoms(data, 4, seed=4, sizes=(64,), quiet=True)  # one patient with a pituitary tumour
    torch.manual_seed(0)
    model = vgg16_small(width=4)
    with torch.no_grad():
        for parameter in model.classifier.parameters():
            parameter.mul_(30)  # logits far enough apart that the prediction (meningioma) is not the label
    meta = {**default_meta('vgg16', 4), 'transform': Transform(size=SIZE).to_dict(), 'input_size': SIZE}
    checkpoint = folder / 'model.pt'
    save_checkpoint(checkpoint, model, meta)
    return folder, str(data), str(checkpoint)


def run(*arguments):
    return CliRunner().invoke(main, ['explain', '--quiet', '--device', 'cpu', *map(str, arguments)])


def reference_relevance(checkpoint, image, target):
    """The relevance explain() gives for one preprocessed (3, S, S) image, with the model's bounds low=0, high=1."""
    model, _ = load_checkpoint(checkpoint)
    return explain(model, image[None], target=target, low=0., high=1.)


def numpy_iou(relevance, mask, quantile=0.9):
    """IoU of the pixels whose positive channel-summed relevance is strictly above its numpy quantile with the mask."""
    positive = np.maximum(relevance.sum(axis=0), 0)
    selected = positive > np.quantile(positive, quantile)
    truth = mask >= 0.5
    return (selected & truth).sum() / (selected | truth).sum()


def printed_probabilities(output):
    return [[float(value) for value in re.findall(r'\d\.\d+', line.split('probabilities')[1])]
            for line in output.splitlines() if 'probabilities' in line]


def test_mat_input_writes_the_relevance_of_its_label_and_prints_its_metrics(setup):
    folder, data, checkpoint = setup
    path = find_slices(data)[1]
    out = folder / 'mat'
    result = run(path, '--checkpoint', checkpoint, '--out', out)
    assert result.exit_code == 0, result.output

    item = read_slice(path)
    image, mask = Transform(size=SIZE)(item.image, item.mask)
    reference = reference_relevance(checkpoint, image, item.label)
    saved = np.load(out / '2.mat.npy')
    assert saved.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(saved, reference.relevance[0].numpy(), rtol=1e-5, atol=1e-7)
    assert (out / '2.mat.png').stat().st_size > 0
    assert sorted(os.listdir(out)) == ['2.mat.npy', '2.mat.png']

    assert reference.predictions[0] != item.label  # so the map of the label is not that of the prediction
    (probabilities,) = printed_probabilities(result.output)
    assert sum(probabilities) == pytest.approx(1, abs=2e-3)
    assert probabilities == pytest.approx(reference.probabilities[0].tolist(), abs=6e-4)
    assert f'relevance of {CLASS_NAMES[item.label]} (the label)' in result.output
    printed_iou = float(re.search(r'iou (\d\.\d+)', result.output).group(1))
    assert printed_iou == pytest.approx(numpy_iou(saved, mask.numpy()), abs=6e-4)
    for name in ('precision', 'recall', 'f1', 'pointing_game', 'mass_accuracy', 'rank_accuracy'):
        assert re.search(rf'{name} (\d\.\d+|n/a)', result.output), name


def test_target_all_writes_one_map_per_class(setup):
    folder, data, checkpoint = setup
    path = find_slices(data)[0]
    out = folder / 'all'
    result = run(path, '--checkpoint', checkpoint, '--out', out, '--target', 'all')
    assert result.exit_code == 0, result.output

    item = read_slice(path)
    image, _ = Transform(size=SIZE)(item.image, item.mask)
    every = np.load(out / '1.mat.classes.npy')
    assert every.shape == (len(CLASS_NAMES), 3, SIZE, SIZE)
    # the K maps are computed as one batch of K copies (batch composition changes LRP's rounding, here by ~0.3 %)
    model, _ = load_checkpoint(checkpoint)
    reference = explain(model, image.repeat(len(CLASS_NAMES), 1, 1, 1), target=torch.arange(len(CLASS_NAMES)))
    np.testing.assert_allclose(every, reference.relevance.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.load(out / '1.mat.npy'), every[item.label])
    assert (out / '1.mat.classes.png').stat().st_size > 0 and (out / '1.mat.png').stat().st_size > 0
    assert len(re.findall(r'\d\.\d+', result.output.split("IoU of each class's map:")[1].splitlines()[0])) == 3


def test_target_by_class_name(setup):
    folder, data, checkpoint = setup
    path = find_slices(data)[0]
    item = read_slice(path)
    image, _ = Transform(size=SIZE)(item.image, item.mask)
    out = folder / 'target'
    result = run(path, '--checkpoint', checkpoint, '--out', out, '--target', 'Glioma')
    assert result.exit_code == 0, result.output
    reference = reference_relevance(checkpoint, image, 1)
    np.testing.assert_allclose(np.load(out / '1.mat.npy'), reference.relevance[0].numpy(), rtol=1e-5, atol=1e-7)
    assert 'relevance of glioma (as asked)' in result.output


def test_parse_target_reads_names_indices_and_keywords():
    names = ['meningioma', 'glioma', 'pituitary']
    assert [parse_target(text, names) for text in ('label', ' PRED', 'all', 'Glioma', '2', 0)] == \
        ['label', 'pred', 'all', 1, 2, 0]
    for bad in ('-1', '3', 3, True, 'tumour', ''):
        with pytest.raises(ExplainError):
            parse_target(bad, names)


def test_png_input_is_explained_for_its_prediction_without_metrics(setup):
    folder, data, checkpoint = setup
    item = read_slice(find_slices(data)[0])
    grey = np.round(255 * (item.image - item.image.min()) / np.ptp(item.image)).astype(np.uint8)
    rgba = np.stack([grey, grey // 2, np.zeros_like(grey), np.full_like(grey, 255)], axis=-1)
    picture = folder / 'scan.png'
    imsave(picture, rgba, check_contrast=False)
    out = folder / 'png'
    result = run(picture, '--checkpoint', checkpoint, '--out', out)
    assert result.exit_code == 0, result.output

    image, _ = Transform(size=SIZE)(rgba[..., :3].astype(np.float64).mean(axis=-1))
    reference = reference_relevance(checkpoint, image, 'pred')
    np.testing.assert_allclose(np.load(out / 'scan.png.npy'), reference.relevance[0].numpy(), rtol=1e-5,
                               atol=1e-7)
    assert 'no tumour mask, so no metrics' in result.output and 'iou' not in result.output
    assert f'relevance of {CLASS_NAMES[int(reference.targets[0])]} (the prediction)' in result.output
    (probabilities,) = printed_probabilities(result.output)
    assert sum(probabilities) == pytest.approx(1, abs=2e-3)
    assert (out / 'scan.png.png').stat().st_size > 0


def test_data_and_index_explain_the_slices_at_those_positions_named_by_their_files(setup):
    folder, data, checkpoint = setup
    refs = find_slices(data)
    out = folder / 'index'
    result = run(refs[0], '--data', data, '--index', 3, '--index', 1, '--checkpoint', checkpoint, '--out', out)
    assert result.exit_code == 0, result.output
    assert result.output.index(f'1.mat: {refs[0]}') < result.output.index(f'4.mat: {refs[3]}') < \
        result.output.index(f'2.mat: {refs[1]}')
    assert sorted(os.listdir(out)) == ['1.mat.npy', '1.mat.png', '2.mat.npy', '2.mat.png', '4.mat.npy', '4.mat.png']
    # the same slice twice would write one name twice: refused
    result = run(refs[0], '--data', data, '--index', 0, '--checkpoint', checkpoint, '--out', folder / 'twice')
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert f'{refs[0]} is given twice (input 1 and --index 0); give each input once' in result.output


@pytest.mark.parametrize('make, arguments, message', [
    (None, ['missing.mat'], r'missing\.mat: no such file'),
    (None, ['missing.png'], r'missing\.png: no such file'),
    (b'hello', ['notes.txt'], r"notes\.txt: cannot explain a file of type '\.txt'"),
    (b'not a png', ['broken.png'], r'broken\.png: cannot be read as an image'),
    (b'not a mat', ['broken.mat'], r'broken\.mat: not a MATLAB v7\.3 MAT-file'),
    (None, ['--target', 'tumour'], r"target must be label, pred, all, a class index or a class name .*'tumour'"),
    (None, ['--target', '3'], r"target class 3 is not one of the model's classes 0 \.\. 2"),
    (None, ['--device', 'tpu'], r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_inputs_give_one_clear_message(setup, tmp_path, make, arguments, message):
    _, data, checkpoint = setup
    if make is not None:
        (tmp_path / arguments[0]).write_bytes(make)
    arguments = [str(tmp_path / argument) if argument.endswith(('.mat', '.png', '.txt')) else argument
                 for argument in arguments]
    if arguments[0].startswith('--'):
        arguments = [find_slices(data)[0], *arguments]
    result = run(*arguments, '--checkpoint', checkpoint, '--out', tmp_path / 'out')
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert re.search(message, result.output), result.output
    assert 'Traceback' not in result.output


def test_index_outside_the_dataset_and_data_without_index_are_refused(setup, tmp_path):
    _, data, checkpoint = setup
    result = run('--data', data, '--index', 4, '--checkpoint', checkpoint, '--out', tmp_path)
    assert result.exit_code == 1
    assert f'{data}: slice index 4 is outside the 4 slices (0 .. 3)' in result.output
    result = run('--data', data, '--checkpoint', checkpoint, '--out', tmp_path)
    assert result.exit_code == 2 and '--data and --index go together' in result.output


def check_default_run(result, out):
    """One slice per class, each with its four-panel figure, its label's map and every class's map."""
    assert result.exit_code == 0, result.output
    names = sorted(name[:-len('.npy')] for name in os.listdir(out) if name.endswith('.npy')
                   and not name.endswith('.classes.npy'))
    assert [name.split('-')[0] for name in names] == sorted(CLASS_NAMES)
    for name in names:
        label = CLASS_NAMES.index(name.split('-')[0])
        every = np.load(out / f'{name}.classes.npy')
        assert every.shape[0] == len(CLASS_NAMES) and np.isfinite(every).all()
        np.testing.assert_array_equal(np.load(out / f'{name}.npy'), every[label])
        assert (out / f'{name}.png').stat().st_size > 0 and (out / f'{name}.classes.png').stat().st_size > 0
    assert len(printed_probabilities(result.output)) == 3
    assert result.output.count('(the label), mask above its 0.9 quantile: iou ') == 3


def test_default_run_explains_one_phantom_per_class(setup, monkeypatch, tmp_path):
    folder, _, checkpoint = setup
    monkeypatch.setenv('LRP_BRAIN_CACHE', str(folder / 'cache'))
    result = run('--checkpoint', checkpoint, '--out', tmp_path / 'explanations')
    check_default_run(result, tmp_path / 'explanations')


@pytest.mark.skipif(not DEMO_MODEL_PATH.is_file(), reason='the demo model has not been trained yet')
def test_bare_command_uses_the_demo_model(setup, monkeypatch, tmp_path):
    folder, _, _ = setup
    monkeypatch.setenv('LRP_BRAIN_CACHE', str(folder / 'cache'))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ['explain', '--quiet'])
    check_default_run(result, tmp_path / 'explanations')
    assert 'model the demo model' in result.output
