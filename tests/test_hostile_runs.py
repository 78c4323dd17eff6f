"""Hostile runs (issue M, round two): outputs that would collide, outputs that cannot be written, parameters that are
refused, checkpoint metadata that is wrong field by field, training that diverges, degenerate runs, and two runs on
one output folder. Each test runs the real command on files it writes and asserts the exact outcome: which files
exist, the message, the exit code."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage.io import imsave

from lrp_brain import outputs
from lrp_brain.cli import main
from lrp_brain.data import Transform, read_image_file
from lrp_brain.explain import explain
from lrp_brain.model import CheckpointError, default_meta, load_checkpoint, save_checkpoint, vgg16_small
from lrp_brain.outputs import exclusive

from command_setup import ENVIRONMENT, read_csv, write_setup

pytestmark = pytest.mark.usefixtures('single_threaded')

SIZE = 32


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A 40-phantom set with a width-4 VGG16 checkpoint (every split part has images), and a 12-phantom set whose
    patient-wise split has empty validation and test parts."""
    folder = tmp_path_factory.mktemp('hostile_runs')
    data, checkpoint = write_setup(folder)
    small = folder / 'small'
    small.mkdir()
    small_data, _ = write_setup(small, phantoms=12)
    return folder, data, checkpoint, small_data


def invoke(*arguments):
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def evaluate_arguments(data, checkpoint, out, *more):
    return ['evaluate', '--data', data, '--checkpoint', checkpoint, '--out', out, '--quiet', '--device', 'cpu',
            '--figures', '0', *more]


def sweep_arguments(data, checkpoint, out, *more):
    return ['sweep', '--data', data, '--checkpoint', checkpoint, '--out', out, '--quiet', '--device', 'cpu', *more]


def train_arguments(data, out, *more):
    return ['train', '--data', data, '--out', out, '--epochs', '1', '--size', SIZE, '--width', 4, '--batch-size', 8,
            '--quiet', '--device', 'cpu', *more]


def error_line(result):
    """The one line a refused command prints, after checking that it is one line, exit code 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert 'Traceback' not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    return line[len('Error: '):]


def write_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40), dtype=np.uint8)
    imsave(path, pixels, check_contrast=False)


@pytest.mark.parametrize('encoding, printed', [('utf-8', b'\xff\xfe.png'), ('latin-1', b'\\udcff\\udcfe.png')])
def test_a_file_name_that_is_not_utf8_is_printed_not_a_traceback(setup, tmp_path, encoding, printed):
    """A file whose name holds bytes that are no UTF-8 (0xFF 0xFE), explained with a strict output stream
    (``PYTHONIOENCODING``): the UTF-8 stream prints the name's own bytes, the Latin-1 one escapes them (and the ε of
    the summary line, which it cannot encode either)."""
    folder, data, checkpoint, _ = setup
    name = os.fsdecode(b'\xff\xfe.png')
    write_png(tmp_path / name, 0)
    result = subprocess.run([sys.executable, '-m', 'lrp_brain', 'explain', str(tmp_path / name), '--checkpoint',
                             checkpoint, '--out', str(tmp_path / 'out')], capture_output=True,
                            env={**ENVIRONMENT, 'PYTHONIOENCODING': encoding}, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors='replace')
    assert b'Traceback' not in result.stderr
    assert b'wrote ' + os.fsencode(tmp_path / 'out') + b'/' + printed in result.stdout
    assert sorted(os.listdir(os.fsencode(tmp_path / 'out'))) == [b'\xff\xfe.png.npy', b'\xff\xfe.png.png']


# --- 1. one naming scheme: outputs never collide and say which input they belong to --------------------------------

def test_explain_outputs_never_collide_and_name_their_input(setup, tmp_path):
    _, _, checkpoint, _ = setup
    inputs = ['col/a/good.png', 'col/b/good.png', 'col/c/good-2.png', 'col/a.png', 'col/a.classes.png']
    for seed, name in enumerate(inputs):
        write_png(tmp_path / name, seed)
    out = tmp_path / 'out'
    result = invoke('explain', *(tmp_path / name for name in inputs), '--checkpoint', checkpoint, '--out', out,
                    '--target', 'all', '--quiet', '--device', 'cpu')
    assert result.exit_code == 0, result.output

    names = ['a%2Fgood.png', 'b%2Fgood.png', 'c%2Fgood-2.png', 'a.png', 'a.classes.png']
    files = [name + suffix for name in names for suffix in ('.png', '.npy', '.classes.png', '.classes.npy')]
    assert sorted(os.listdir(out)) == sorted(files)  # 20 distinct files, 4 per input: nothing overwritten
    for file in files:
        assert result.output.count(f'{out / file}') == 1, file  # each written once, printed once
    model, meta = load_checkpoint(checkpoint)
    transform = Transform.from_dict(meta['transform'])
    for name, path in zip(names, inputs):
        assert result.output.count(f'{name}: {tmp_path / path}\n') == 1
        image, _ = transform(read_image_file(tmp_path / path))
        reference = explain(model, image.repeat(3, 1, 1, 1), target=torch.arange(3))
        np.testing.assert_allclose(np.load(out / f'{name}.classes.npy'), reference.relevance.numpy(), rtol=1e-5,
                                   atol=1e-7)  # each file holds its own input's maps

    again = invoke('explain', tmp_path / inputs[0], tmp_path / 'col/b/../a/good.png', '--checkpoint', checkpoint,
                   '--out', tmp_path / 'again', '--quiet', '--device', 'cpu')
    assert error_line(again) == f'{tmp_path / "col/b/../a/good.png"} is given twice (input 1 and input 2); give ' \
                                f'each input once'
    assert not (tmp_path / 'again').exists()

    deep = os.path.join(*['d' * 100] * 3, 'x.png')  # escaped: 3 × 100 + 3 × 3 + 5 = 314 bytes, over 255
    long = invoke('explain', tmp_path / 'col/a.png', tmp_path / 'col' / deep, '--checkpoint', checkpoint, '--out',
                  tmp_path / 'again', '--quiet', '--device', 'cpu')
    assert error_line(long) == f'{tmp_path / "col" / deep}: its output name {deep.replace("/", "%2F")!r} would be ' \
                               f'longer than the 255 bytes a file name may have; move or rename the input'
    assert not (tmp_path / 'again').exists()


# --- 4. outputs that cannot be written: one message naming the path, found before any work --------------------------

def _no_work(monkeypatch):
    """Make every command's computing step fail loudly, so a refusal is known to come before any work."""
    def computed(*args, **kwargs):
        raise AssertionError('work was done before the output was checked')

    monkeypatch.setattr('lrp_brain.explain_files.explain', computed)
    monkeypatch.setattr('lrp_brain.explain_files.explain_all_classes', computed)
    monkeypatch.setattr('lrp_brain.evaluate.explain', computed)
    monkeypatch.setattr('lrp_brain.sweep_engine.SweepEngine.iter_relevance', computed)
    monkeypatch.setattr('lrp_brain.train._train_epoch', computed)


def _full_disk(monkeypatch, folder):
    """Every write to a file under ``folder`` fails as on a full disk (ENOSPC)."""
    write = os.write

    def full(handle, data):
        if os.readlink(f'/proc/self/fd/{handle}').startswith(os.fspath(folder)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(handle, data)

    monkeypatch.setattr(os, 'write', full)


def _read_only(monkeypatch, folder):
    """``folder`` without write permission (mode 0o500); as root, who writes there anyway, creating a file in it
    fails as it does for any other user (EACCES)."""
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root
        mkstemp = outputs.tempfile.mkstemp

        def refused(*args, dir=None, **kwargs):
            if os.fspath(dir).startswith(os.fspath(folder)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, '.write-probe'))
            return mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(outputs.tempfile, 'mkstemp', refused)


@pytest.mark.parametrize('command', ['explain', 'evaluate', 'sweep', 'train'])
@pytest.mark.parametrize('case', ['under a file', 'in /proc', '/dev/null', 'a full disk', 'read-only'])
def test_unwritable_outputs_get_one_message_before_any_work(setup, tmp_path, monkeypatch, command, case):
    _, data, checkpoint, _ = setup
    _no_work(monkeypatch)
    (tmp_path / 'file').write_text('a file, not a folder')
    folder, reason = {
        'under a file': (tmp_path / 'file' / 'out', f'{tmp_path / "file"} exists and is not a folder'),
        'in /proc': ('/proc/lrp-brain-test/out', 'No such file or directory (/proc/lrp-brain-test)'),
        '/dev/null': ('/dev/null', '/dev/null exists and is not a folder'),
        'a full disk': (tmp_path / 'full', 'No space left on device'),
        'read-only': (tmp_path / 'read-only', f'Permission denied ({tmp_path / "read-only" / ".write-probe"})'),
    }[case]
    if case == 'a full disk':
        _full_disk(monkeypatch, folder)
    if case == 'read-only':
        _read_only(monkeypatch, folder)
        reason = reason if os.access(folder, os.W_OK) else 'Permission denied ('
    if command == 'train' and case == '/dev/null':
        folder = tmp_path / 'pipe'  # a device is not replaced in this test even by mistake: a pipe stands for it
        os.mkfifo(folder)
        arguments = train_arguments(data, folder)
        expected = f'cannot write {folder}: it exists and is not a regular file (a folder, device or pipe); ' \
                   f'choose another output'
    else:
        expected = f'cannot write the output folder {folder}: {reason}'
        arguments = {
            'explain': ['explain', '--data', data, '--index', 0, '--checkpoint', checkpoint, '--out', folder,
                        '--quiet', '--device', 'cpu'],
            'evaluate': evaluate_arguments(data, checkpoint, folder),
            'sweep': sweep_arguments(data, checkpoint, folder, '--eps', '0.25', '--gamma', '0.1'),
            'train': train_arguments(data, os.path.join(folder, 'model.pt')),
        }[command]
    line = error_line(invoke(*arguments))
    if case == 'read-only' and not os.access(folder, os.W_OK):
        assert line.startswith(expected), line
    else:
        assert line == expected
    if case in ('a full disk', 'read-only'):
        monkeypatch.undo()
        assert os.listdir(folder) == []  # the probe left nothing behind


# --- 5. parameters are checked before any state is written ----------------------------------------------------------

@pytest.mark.parametrize('arguments, message', [
    (['--eps', 'nan'], 'epsilon must be finite, got nan'),
    (['--eps', '-1'], 'epsilon must be >= 0, got -1.0; negative values turn the rule into its opposite and are only '
                      'accepted with allow_negative=True (to reproduce the seed study grid)'),
    (['--gamma', 'inf'], 'gamma must be finite, got inf'),
    (['--quantile', '1'], 'quantile must lie in [0, 1), got 1.0; the mask above the 1 quantile (the largest value) '
                          'selects no pixel'),
    (['--method', 'gradient', '--eps', 'nan'], 'epsilon must be finite, got nan'),
])
def test_evaluate_refuses_bad_parameters_before_writing_anything(setup, tmp_path, arguments, message):
    _, data, checkpoint, _ = setup
    out = tmp_path / 'evaluation'
    assert error_line(invoke(*evaluate_arguments(data, checkpoint, out, *arguments))) == message
    assert not out.exists()  # no rows.jsonl, no .run.json: nothing for the corrected rerun to trip over
    result = invoke(*evaluate_arguments(data, checkpoint, out, '--eps', '0.25'))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ['rows.csv', 'rows.jsonl', 'rows.jsonl.run.json', 'summary.json']


@pytest.mark.parametrize('arguments, message', [
    (['--eps', '0,nan'], 'epsilons[1] = nan: epsilon must be finite, got nan'),
    (['--gamma', '0.1,-1'], 'gammas[1] = -1: gamma must be >= 0, got -1.0; negative values turn the rule into its '
                            'opposite and are only accepted with allow_negative=True (to reproduce the seed study '
                            'grid)'),
    (['--quantile', '0.9,1'], 'quantiles: quantile must lie in [0, 1), got 1.0; the mask above the 1 quantile (the '
                              'largest value) selects no pixel'),
])
def test_sweep_refuses_bad_grids_before_writing_anything(setup, tmp_path, arguments, message):
    _, data, checkpoint, _ = setup
    out = tmp_path / 'sweep'
    assert error_line(invoke(*sweep_arguments(data, checkpoint, out, *arguments))) == message
    assert not out.exists()


# --- 6. checkpoint metadata is checked field by field -------------------------------------------------------------

#: A metadata change that removes the field.
REMOVED = object()


def _checkpoint(path, **changes):
    """A valid width-4 VGG16 checkpoint, then its metadata changed (:data:`REMOVED` removes a field;
    ``transform_<key>`` changes a field of the transform), written as ``torch.save`` writes it."""
    torch.manual_seed(0)
    save_checkpoint(path, vgg16_small(width=4), {**default_meta('vgg16', 4), 'input_size': SIZE,
                                                 'transform': Transform(size=SIZE).to_dict()})
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        meta, key = (payload['meta']['transform'], key[len('transform_'):]) if key.startswith('transform_') \
            else (payload['meta'], key)
        if value is REMOVED:
            del meta[key]
        else:
            meta[key] = value
    torch.save(payload, path)
    return path


@pytest.mark.parametrize('changes, message', [
    ({'transform': REMOVED}, 'meta lacks the field(s) transform'),
    ({'transform_size': None}, 'meta field transform: transform size must be an integer from 1 to 4096, got None'),
    ({'transform_value_range': 'ab'}, "meta field transform: transform value_range must be two numbers (low, high), "
                                      "got 'ab'"),
    ({'transform': [SIZE]}, "meta field transform: transform must be a dict of ['flips', 'mean', 'scaling', 'size', "
                            "'std', 'value_range'], got list [32]"),
    ({'input_size': -5}, 'meta field input_size must be an integer from 1 to 4096, got -5'),
    ({'input_size': 0}, 'meta field input_size must be an integer from 1 to 4096, got 0'),
    ({'class_names': ['meningioma', 'glioma']}, 'meta field class_names has 2 names (meningioma, glioma) but the '
                                                'network has 3 outputs (num_classes); give one name per output'),
    ({'class_names': REMOVED}, 'meta lacks the field(s) class_names'),
])
def test_checkpoint_metadata_is_checked_field_by_field(tmp_path, changes, message):
    path = _checkpoint(tmp_path / 'model.pt', **changes)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    assert str(raised.value) == f'{path}: {message}'
    for command in (['check'], ['explain', '--device', 'cpu', '--out', tmp_path / 'out']):
        assert error_line(invoke(*command, '--checkpoint', path)) == f'{path}: {message}'  # no NOT SAFE, no traceback
    assert not (tmp_path / 'out').exists()


# --- 7. a diverging training run stops, says why, and leaves the last good state -------------------------------------

@pytest.mark.parametrize('lr, message', [
    ('inf', 'the learning rate (--lr) must be a finite number > 0, got inf'),
    ('nan', 'the learning rate (--lr) must be a finite number > 0, got nan'),
])
def test_train_refuses_a_learning_rate_that_is_not_finite(setup, tmp_path, lr, message):
    _, data, _, _ = setup
    assert error_line(invoke(*train_arguments(data, tmp_path / 'run' / 'model.pt', '--lr', lr))) == message
    assert not (tmp_path / 'run').exists()
    for bad in ('0', '-1'):
        result = invoke(*train_arguments(data, tmp_path / 'run' / 'model.pt', '--lr', bad))
        assert result.exit_code == 2 and f"Invalid value for '--lr': {float(bad)} is not in the range x>0" in \
            result.output


def test_diverging_training_stops_and_keeps_the_last_good_epoch(setup, tmp_path, monkeypatch):
    _, data, _, _ = setup
    out = tmp_path / 'diverged' / 'model.pt'
    line = error_line(invoke(*train_arguments(data, out, '--lr', '1e30')))
    assert line == ('training diverged: the loss of epoch 1, batch 2 of 2 is not finite (nan) with the learning '
                    'rate 1e+30; try a smaller --lr. No model and no resume state were saved: no epoch finished')
    assert sorted(os.listdir(out.parent)) == ['model.split.json']

    # a loss that turns NaN in epoch 2: epoch 1's model and resume state are kept as they were
    out = tmp_path / 'kept' / 'model.pt'
    result = invoke(*train_arguments(data, out))
    assert result.exit_code == 0, result.output
    kept = {name: (out.parent / name).read_bytes() for name in ('model.pt', 'model.pt.last')}
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, 'cross_entropy', lambda *args: cross_entropy(*args) * float('nan'))
    line = error_line(invoke(*train_arguments(data, out, '--epochs', '2')))
    assert line == (f'training diverged: the loss of epoch 2, batch 1 of 2 is not finite (nan) with the learning '
                    f'rate 0.0001; try a smaller --lr. Kept as they were: the model of epoch 1 in {out} and the state '
                    f'after epoch 1 in {out}.last; delete both to start over with another learning rate')
    assert {name: (out.parent / name).read_bytes() for name in kept} == kept
    assert load_checkpoint(out)[1]['epoch'] == 1
    assert not (out.parent / 'model.pt.lock').exists()


# --- 8. degenerate runs: empty split parts, the quantile 1, repeated grid values -----------------------------------

def test_degenerate_runs_are_refused_or_merged(setup, tmp_path):
    _, data, checkpoint, small_data = setup
    out = tmp_path / 'empty'
    assert error_line(invoke(*evaluate_arguments(small_data, checkpoint, out))) == (
        f'{small_data}: the test part of the split is empty (train 12, val 0, test 0 images): nothing to evaluate; '
        f'choose another part or a split with test images')
    assert not out.exists()
    report = invoke('data', small_data, '--quiet')
    assert report.exit_code == 1
    for part in ('val', 'test'):
        assert (f'  split: the {part} part is empty (train 12, val 0, test 0 slices); evaluate, sweep and train need '
                f'slices in every part: add patients or choose another split') in report.output.splitlines()

    out = tmp_path / 'merged'
    result = invoke(*sweep_arguments(data, checkpoint, out, '--eps', '0,-0,0', '--gamma', '0.1,0.1',
                                     '--quantile', '0.9'))
    assert result.exit_code == 0, result.output
    assert 'note: --eps 0, -0, 0 repeats values (-0 is 0); each setting is computed once: --eps 0' in result.output
    assert 'note: --gamma 0.1, 0.1 repeats values (-0 is 0); each setting is computed once: --gamma 0.1' in \
        result.output
    table = read_csv(out / 'sweep.csv')
    assert [(row['epsilon'], row['gamma'], row['quantile']) for row in table] == [('0.0', '0.1', '0.9')]
    choice = json.loads((out / 'choice.json').read_text())
    assert choice['grid']['epsilons'] == [0.0] and str(choice['grid']['epsilons'][0]) == '0.0'  # not -0.0


# --- 10. a second run on the same outputs is told that they are in use --------------------------------------------

def test_a_second_run_on_the_same_outputs_is_refused_and_a_killed_one_does_not_block(setup, tmp_path):
    _, data, checkpoint, _ = setup
    out = tmp_path / 'evaluation'
    with exclusive(out / '.lock', f'the output folder {out}'):
        holder = (out / '.lock').read_text().strip()
        assert holder.startswith(f'process {os.getpid()} on {socket.gethostname()} since ')
        expected = f'the output folder {out} is in use by another run ({holder}); wait until it ends, or choose ' \
                   f'another output'
        assert error_line(invoke(*evaluate_arguments(data, checkpoint, out))) == expected
        assert error_line(invoke(*sweep_arguments(data, checkpoint, out, '--eps', '0.25', '--gamma', '0.1'))) == \
            expected
        assert os.listdir(out) == ['.lock']  # the refused runs wrote nothing
        model = tmp_path / 'models' / 'model.pt'
        with exclusive(f'{model}.lock', model):
            assert error_line(invoke(*train_arguments(data, model))) == \
                f'{model} is in use by another run ({(tmp_path / "models" / "model.pt.lock").read_text().strip()}); ' \
                f'wait until it ends, or choose another output'
    assert not (out / '.lock').exists()

    # a run killed with SIGKILL holds nothing: the lock dies with its process
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from lrp_brain.outputs import exclusive\n'
                               'with exclusive(sys.argv[1], "out"):\n    print("held", flush=True); time.sleep(600)',
         str(out / '.lock')], stdout=subprocess.PIPE, text=True, env=ENVIRONMENT)
    try:
        assert holder.stdout.readline() == 'held\n'
        assert 'is in use by another run (process' in error_line(invoke(*evaluate_arguments(data, checkpoint, out)))
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        holder.kill()
        holder.stdout.close()
    assert (out / '.lock').exists()  # left by the killed run; not a lock any more
    result = invoke(*evaluate_arguments(data, checkpoint, out))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ['rows.csv', 'rows.jsonl', 'rows.jsonl.run.json', 'summary.json']
