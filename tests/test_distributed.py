"""torchrun: evaluate, sweep and train in two processes (gloo, CPU) give what one process gives.

Every launch here is a real ``torchrun`` of the command line (``python -m torch.distributed.run``), compared with
the same command run as one plain process with the thread count torchrun gives its workers (one), so the only
difference is the number of processes.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lrp_brain import distributed

from command_setup import ENVIRONMENT, JOBS, read_csv, run, write_setup


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('distributed')
    return (folder, *write_setup(folder))


def read_json(path, leave_out=('processes',)):
    with open(path) as file:
        return {key: value for key, value in json.load(file).items() if key not in leave_out}


def free_port():
    with socket.socket() as probe:
        probe.bind(('localhost', 0))
        return probe.getsockname()[1]


def test_single_process_functions_are_trivial():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert list(distributed.rounds(['a', 'b'])) == ['a', 'b']
    assert distributed.gather(lambda: 3) == [3]
    assert distributed.on_main(lambda: 4) == 4
    with pytest.raises(ZeroDivisionError):
        distributed.gather(lambda: 1 / 0)
    assert distributed.all_reduce_sum(torch.tensor([1., 2.])).tolist() == [1., 2.]


def test_errors_reach_every_process():
    result = run([JOBS, 'errors'], processes=2)
    for rank in (0, 1):
        assert f'rank {rank} raised KeyError: \'rank 1 failed\'' in result.stdout
        assert f'rank {rank} raised ZeroDivisionError' in result.stdout
        assert f'rank {rank} raised ValueError: the cache could not be written' in result.stdout
        assert f'ok {rank}' in result.stdout


def evaluate_command(data, checkpoint, out):
    return ['-m', 'lrp_brain', 'evaluate', '--data', data, '--checkpoint', checkpoint, '--out', str(out), '--quiet',
            '--device', 'cpu', '--batch-size', '3', '--figures', '1']


def test_evaluate_in_two_processes_equals_one(setup):
    folder, data, checkpoint = setup
    run(evaluate_command(data, checkpoint, folder / 'evaluate1'))
    result = run(evaluate_command(data, checkpoint, folder / 'evaluate2'), processes=2)
    assert result.stdout.count('wrote') == 1, 'only rank 0 prints'
    single, double = read_csv(folder / 'evaluate1' / 'rows.csv'), read_csv(folder / 'evaluate2' / 'rows.csv')
    assert len(single) == 14 and double == single
    assert read_json(folder / 'evaluate2' / 'summary.json') == read_json(folder / 'evaluate1' / 'summary.json')
    assert json.loads((folder / 'evaluate2' / 'summary.json').read_text())['processes'] == 2
    assert sorted(os.listdir(folder / 'evaluate2' / 'figures')) == ['best1.png', 'worst1.png']
    lines = (folder / 'evaluate2' / 'rows.jsonl').read_text().splitlines()
    assert sorted(json.loads(line)['file'] for line in lines) == sorted(row['file'] for row in single)


def test_evaluate_on_two_nodes_equals_one_process(setup):
    """Two torchrun agents meeting at a c10d rendezvous, as on two machines (here both on localhost)."""
    folder, data, checkpoint = setup
    if not (folder / 'evaluate1' / 'rows.csv').exists():
        run(evaluate_command(data, checkpoint, folder / 'evaluate1'))
    rendezvous = ['--nnodes=2', '--nproc-per-node=1', '--rdzv-backend=c10d',
                  f'--rdzv-endpoint=localhost:{free_port()}', '--rdzv-id=lrp-brain-test']
    command = [sys.executable, '-m', 'torch.distributed.run', *rendezvous,
               *evaluate_command(data, checkpoint, folder / 'nodes')]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENVIRONMENT)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert read_csv(folder / 'nodes' / 'rows.csv') == read_csv(folder / 'evaluate1' / 'rows.csv')


def test_sweep_in_two_processes_equals_one(setup):
    folder, data, checkpoint = setup
    command = ['-m', 'lrp_brain', 'sweep', '--data', data, '--checkpoint', checkpoint, '--quiet', '--device', 'cpu',
               '--batch-size', '3', '--eps', '0,1', '--gamma', '0,0.5']
    run([*command, '--out', str(folder / 'sweep1')])
    run([*command, '--out', str(folder / 'sweep2')], processes=2)
    single = read_csv(folder / 'sweep1' / 'sweep.csv')
    assert len(single) == 4 and read_csv(folder / 'sweep2' / 'sweep.csv') == single
    assert read_json(folder / 'sweep2' / 'choice.json') == read_json(folder / 'sweep1' / 'choice.json')
    for part in ('val', 'test'):
        rows = [json.loads(line) for line in (folder / 'sweep2' / f'{part}.rows.jsonl').read_text().splitlines()]
        assert len(rows) == len({row['file'] for row in rows}) > 0


def test_a_refused_resume_stops_every_process(setup):
    folder, data, checkpoint = setup
    out = folder / 'refused'
    run(evaluate_command(data, checkpoint, out))
    os.remove(out / 'rows.csv')
    result = run([*evaluate_command(data, checkpoint, out), '--eps', '0.5'], processes=2, check=False)
    assert result.returncode != 0
    assert 'holds an unfinished run with different settings' in result.stdout + result.stderr
    assert not (out / 'rows.csv').exists()


def test_train_in_two_processes_follows_one(setup):
    """DistributedDataParallel with each batch dealt out over two processes takes the steps one process takes.

    Dropout is switched off (its masks are drawn per process); batches of 7 split 4 + 3, so an unweighted mean of
    the two processes' gradients would differ (by about 1.8 relative, measured) from the batch's mean gradient.
    """
    folder, data, _ = setup
    run([JOBS, 'train', data, str(folder / 'train1' / 'model.pt')])
    run([JOBS, 'train', data, str(folder / 'train2' / 'model.pt')], processes=2)
    single, double = (torch.load(folder / name / 'model.pt', weights_only=True)['state_dict']
                      for name in ('train1', 'train2'))
    for key, weights in single.items():
        # float sums in another order, amplified by Adam's normalisation of small gradients: 2e-5 measured
        assert (double[key] - weights).abs().max() <= 1e-3 * weights.abs().max(), key
    histories = [torch.load(folder / name / 'model.pt.last', weights_only=True)['history']
                 for name in ('train1', 'train2')]
    for one, two in zip(*histories):
        assert two['train_loss'] == pytest.approx(one['train_loss'], rel=1e-5)
        assert (two['train_accuracy'], two['val_accuracy']) == (one['train_accuracy'], one['val_accuracy'])
    assert read_json(folder / 'train2' / 'model.test.json', ('checkpoint', 'split_file', 'versions')) == \
        read_json(folder / 'train1' / 'model.test.json', ('checkpoint', 'split_file', 'versions'))
