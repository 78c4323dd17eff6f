"""Training: outputs and their metadata, the patient-wise split, test evaluation, resuming and determinism."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lrp_brain.cli import main
from lrp_brain.data import CLASS_NAMES, Split, Transform, find_slices, read_slice
from lrp_brain.model import load_checkpoint, save_checkpoint, vgg16_small
from lrp_brain.outputs import ResumeError
from lrp_brain.phantom import write_phantoms
from lrp_brain.train import (
    Evaluation, LabelledSlices, confusion_matrix, derived_seed, output_paths, train,
)

pytestmark = pytest.mark.usefixtures('single_threaded')

# a tiny VGG16 topology on 32 px input: a few seconds per run on two cores
TINY = dict(arch='vgg16', width=4, size=32, batch_size=8, lr=1e-3, seed=3, progress=False)


@pytest.fixture(scope='module')
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp('phantoms')
    write_phantoms(folder, 36, seed=5, sizes=(64,), quiet=True)
    return str(folder)


def _predict(model, refs, transform):
    """Reference predictions: one slice at a time, straight from the files."""
    with torch.no_grad():
        return [int(model(transform(read_slice(ref).image)[0][None]).argmax()) for ref in refs]


def test_confusion_matrix_counts_true_rows_predicted_columns():
    matrix = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    evaluation = Evaluation(matrix, CLASS_NAMES)
    assert evaluation.count == 6
    assert evaluation.accuracy == pytest.approx(4 / 6)
    assert evaluation.per_class == pytest.approx({'meningioma': .5, 'glioma': 1., 'pituitary': 2 / 3})
    assert Evaluation(confusion_matrix([1], [1], 3), CLASS_NAMES).per_class['meningioma'] is None


def test_flips_depend_on_seed_epoch_and_index_only(phantoms):
    refs = find_slices(phantoms)[:4]
    plain = LabelledSlices(refs, Transform(size=32))
    flipping = LabelledSlices(refs, Transform(size=32, flips=True), seed=1)
    unflipped = plain[2][0]
    assert not torch.equal(unflipped, unflipped.flip(-1))
    seen = []
    for epoch in range(12):
        flipping.set_epoch(epoch)
        image, label = flipping[2]
        assert label == read_slice(refs[2]).label
        assert torch.equal(image, unflipped) or torch.equal(image, unflipped.flip(-1))
        seen.append(torch.equal(image, unflipped.flip(-1)))
        # the same (seed, epoch, index) flips the same way, whatever was read before
        assert torch.equal(flipping[2][0], image)
    assert any(seen) and not all(seen)
    assert len({derived_seed(1, epoch, 2) for epoch in range(12)}) == 12


def test_train_writes_best_checkpoint_split_and_test_report(phantoms, tmp_path):
    out = tmp_path / 'run' / 'model.pt'
    result = train(phantoms, out, epochs=2, **TINY)
    paths = output_paths(out)
    assert result.paths == paths
    assert sorted(path.name for path in (tmp_path / 'run').iterdir()) == [
        'model.confusion.png', 'model.pt', 'model.pt.last', 'model.split.json', 'model.test.json']
    assert all(paths[name] == str(tmp_path / 'run' / file) for name, file in (
        ('checkpoint', 'model.pt'), ('resume', 'model.pt.last'), ('split', 'model.split.json'),
        ('confusion', 'model.confusion.png'), ('test', 'model.test.json')))

    # the split: patient-wise, covering every slice once
    split = Split.load(paths['split'])
    parts = split.parts()
    assert sorted(ref for refs in parts.values() for ref in refs) == sorted(find_slices(phantoms))
    patients = {name: {read_slice(ref).patient for ref in refs} for name, refs in parts.items()}
    assert all(patients.values())
    assert not (patients['train'] & patients['val'] or patients['train'] & patients['test']
                or patients['val'] & patients['test'])

    # the checkpoint: the model best on validation, with what is needed to use it
    model, meta = load_checkpoint(out)
    assert [row['epoch'] for row in result.history] == [1, 2]
    val_accuracies = [row['val_accuracy'] for row in result.history]
    assert result.best_epoch == 1 + int(np.argmax(val_accuracies))
    assert meta['epoch'] == result.best_epoch
    assert meta['val_accuracy'] == result.val_accuracy == max(val_accuracies)
    assert (meta['arch'], meta['width'], meta['num_classes'], meta['input_size']) == ('vgg16', 4, 3, 32)
    assert meta['class_names'] == list(CLASS_NAMES)
    assert meta['transform'] == Transform(size=32).to_dict()
    assert meta['split_file'] == paths['split']
    assert meta['seed'] == 3 and meta['training']['lr'] == 1e-3 and meta['training']['optimizer'] == 'Adam'
    best_predictions = _predict(model, split.val, Transform(size=32))
    labels = [read_slice(ref).label for ref in split.val]
    assert np.mean(np.equal(best_predictions, labels)) == pytest.approx(meta['val_accuracy'])

    # the test report: the best model's predictions on the test split, recomputed here one slice at a time
    labels = [read_slice(ref).label for ref in split.test]
    expected = np.zeros((3, 3), dtype=int)
    for label, prediction in zip(labels, _predict(model, split.test, Transform(size=32))):
        expected[label, prediction] += 1
    np.testing.assert_array_equal(result.test.matrix, expected)
    report = json.loads((tmp_path / 'run' / 'model.test.json').read_text())
    assert report['test']['matrix'] == expected.tolist()
    assert report['test']['accuracy'] == pytest.approx(np.trace(expected) / len(labels))
    assert report['best_epoch'] == result.best_epoch
    assert (tmp_path / 'run' / 'model.confusion.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_resume_continues_after_the_last_epoch_and_matches_an_uninterrupted_run(phantoms, tmp_path):
    interrupted, whole = tmp_path / 'interrupted' / 'model.pt', tmp_path / 'whole' / 'model.pt'
    arguments = ['--arch', 'vgg16', '--width', '4', '--size', '32', '--batch-size', '8', '--lr', '0.001',
                 '--seed', '3', '--device', 'cpu', '--quiet', '--data', phantoms]
    first = CliRunner().invoke(main, ['train', *arguments, '--epochs', '1', '--out', str(interrupted)])
    assert first.exit_code == 0, first.output
    assert 'best epoch 1 of 1' in first.output and 'test split, accuracy' in first.output
    assert 'meningioma' in first.output

    resumed = train(phantoms, interrupted, epochs=2, device='cpu', **TINY)
    assert resumed.resumed_from == 1 and resumed.epochs == 2
    assert [row['epoch'] for row in resumed.history] == [1, 2]

    # data loading in a worker process flips and shuffles the same
    uninterrupted = train(phantoms, whole, epochs=2, device='cpu', num_workers=1, **TINY)
    assert uninterrupted.resumed_from == 0
    assert resumed.history == uninterrupted.history
    states = [torch.load(output_paths(out)['resume'], weights_only=True) for out in (interrupted, whole)]
    assert states[0]['epoch'] == states[1]['epoch'] == 2
    for key, value in states[1]['model'].items():
        assert torch.equal(states[0]['model'][key], value), key

    # a finished run asked again trains nothing
    again = train(phantoms, whole, epochs=2, device='cpu', **TINY)
    assert again.resumed_from == 2 and again.history == uninterrupted.history
    np.testing.assert_array_equal(again.test.matrix, uninterrupted.test.matrix)


def test_resume_with_other_arguments_is_refused(phantoms, tmp_path):
    out = tmp_path / 'model.pt'
    first = train(phantoms, out, epochs=2, **TINY)
    with pytest.raises(ResumeError, match=r'lr=0\.001 there, 0\.01 now'):
        train(phantoms, out, epochs=3, **{**TINY, 'lr': 1e-2})
    with pytest.raises(ResumeError, match=r'size=32 there, 48 now'):
        train(phantoms, out, epochs=3, **{**TINY, 'size': 48})
    with pytest.raises(ResumeError, match='2 finished epochs, more than the 1 asked for'):
        train(phantoms, out, epochs=1, **TINY)

    # a model without resume state: one of this command (stopped after its first epoch) starts afresh ...
    (tmp_path / 'model.pt.last').unlink()
    restarted = train(phantoms, out, epochs=1, **TINY)
    assert restarted.resumed_from == 0 and restarted.history == first.history[:1]
    # ... one written otherwise is never overwritten
    other = tmp_path / 'other.pt'
    save_checkpoint(other, vgg16_small(width=4), {})
    with pytest.raises(ResumeError, match='other.pt exists, was not written by this command'):
        train(phantoms, other, epochs=1, **TINY)


def test_bad_device_is_refused_clearly(phantoms, tmp_path):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        train(phantoms, tmp_path / 'model.pt', epochs=1, device='gpu', **TINY)
    result = CliRunner().invoke(main, ['train', '--data', phantoms, '--epochs', '1', '--out',
                                       str(tmp_path / 'model.pt'), '--device', 'gpu'])
    assert result.exit_code != 0
    assert "device must be auto, cpu, cuda or cuda:N, got 'gpu'" in result.output
    assert not (tmp_path / 'model.pt').exists()
