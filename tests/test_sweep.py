"""``lrp-brain sweep``: chosen on validation, reported on test, equal to single evaluations, and kill-safe."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from lrp_brain.evaluate import evaluate
from lrp_brain.sources import open_source
from lrp_brain.sweep import SEED_STUDY, SweepError, pareto_choice, pareto_front, run_sweep

from command_setup import read_csv, write_setup

# The tests whose numbers pass through Zennit's hooks (the engine's layer groups, the composite it is checked against)
# are marked zennit_both and run under both Zennit versions; the protocol, resume and arithmetic tests run once.

EPSILONS, GAMMAS = (0., 0.25, 10.), (0., 0.1, 1.)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sweep')
    return (folder, *write_setup(folder, phantoms=60, data_seed=7, model_seed=1, he_init=True))


@pytest.fixture(scope='module')
def result(setup):
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    return run_sweep(source, EPSILONS, GAMMAS, out=str(folder / 'full'), progress=False, batch_size=4)


@pytest.mark.zennit_both
def test_outputs_and_honest_choice(setup, result):
    folder = setup[0] / 'full'
    table = read_csv(folder / 'sweep.csv')
    assert [(float(row['epsilon']), float(row['gamma'])) for row in table] == \
        [(epsilon, gamma) for epsilon in EPSILONS for gamma in GAMMAS]
    best = max(table, key=lambda row: float(row['val_iou']))
    choice = json.loads((folder / 'choice.json').read_text())
    assert choice['selected_on'] == 'val' and choice['reported_on'] == 'test'
    assert (choice['best']['epsilon'], choice['best']['gamma']) == (float(best['epsilon']), float(best['gamma']))
    assert choice['test']['iou']['overall']['mean'] == pytest.approx(float(best['test_iou']))
    assert (folder / 'heatmap.png').stat().st_size > 0
    # the choice is the validation optimum even where the test optimum differs
    assert result.best['val_iou'] == max(row['val_iou'] for row in result.table)


@pytest.mark.zennit_both
@pytest.mark.parametrize('epsilon, gamma', [(0.25, 0.1), (10., 0.)])
def test_sweep_equals_single_evaluations(setup, result, epsilon, gamma):
    """The engine's numbers equal the composite's, through the whole evaluate path."""
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    row = next(row for row in result.table if (row['epsilon'], row['gamma']) == (epsilon, gamma))
    for part in ('val', 'test'):
        _, summary = evaluate(source, part, epsilon=epsilon, gamma=gamma, progress=False, batch_size=4)
        assert row[f'{part}_iou'] == pytest.approx(summary['iou']['overall']['mean'], rel=1e-5)
        assert row[f'{part}_n'] == summary['iou']['overall']['n']
        assert row[f'{part}_faithfulness_gap'] == pytest.approx(summary['faithfulness_gap']['overall']['mean'],
                                                                rel=1e-4)


def test_killed_sweep_resumes_to_the_same_table(setup, result):
    folder, data, checkpoint = setup
    out = folder / 'killed'
    command = [sys.executable, '-m', 'lrp_brain', 'sweep', '--data', data, '--checkpoint', checkpoint,
               '--eps', ','.join(map(str, EPSILONS)), '--gamma', ','.join(map(str, GAMMAS)), '--out', str(out),
               '--batch-size', '4', '--device', 'cpu', '--quiet']
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / 'val.rows.jsonl'
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / 'sweep.csv').exists(), 'the sweep finished before it could be killed'

    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    table = read_csv(out / 'sweep.csv')
    reference = read_csv(setup[0] / 'full' / 'sweep.csv')
    assert len(table) == len(EPSILONS) * len(GAMMAS)
    assert table == reference
    for part in ('val', 'test'):
        files = [json.loads(line)['file'] for line in (out / f'{part}.rows.jsonl').read_text().splitlines()]
        assert len(files) == len(set(files)) == len(getattr(open_source(checkpoint, data, quiet=True).split, part))


def test_seed_study_grid_is_the_studys():
    assert SEED_STUDY['epsilons'] == SEED_STUDY['gammas'] == tuple(range(-100, 101, 20))
    assert SEED_STUDY['quantiles'] == (0.95,) and SEED_STUDY['size'] == 256
    assert (SEED_STUDY['split_method'], SEED_STUDY['split_seed']) == ('random', 42)


def test_seed_study_preset_states_its_bias(setup, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from lrp_brain.cli import main
    from lrp_brain.data import PatientLeakageWarning

    # the study's protocol on a 3x3 corner of its grid (the full 11x11 grid at 256 px takes minutes here)
    monkeypatch.setitem(SEED_STUDY, 'epsilons', (-100., 0., 100.))
    monkeypatch.setitem(SEED_STUDY, 'gammas', (-100., 0., 100.))
    folder, data, checkpoint = setup
    out = tmp_path / 'study'
    with pytest.warns(PatientLeakageWarning, match='patient leakage'):  # the random file split says what it costs
        result = CliRunner().invoke(main, ['sweep', '--seed-study', '--data', data, '--checkpoint', checkpoint,
                                           '--out', str(out), '--quiet', '--device', 'cpu', '--batch-size', '8'])
    assert result.exit_code == 0, result.output
    assert 'biased' in result.output and 'patient' in result.output
    choice = json.loads((out / 'choice.json').read_text())
    assert choice['split']['method'] == 'random' and choice['split']['seed'] == 42
    assert choice['grid']['epsilons'][0] == -100 and choice['grid']['quantiles'] == [0.95]
    assert choice['grid']['input_size'] == 256
    assert 'study_choice' in choice and choice['selected_on'] == 'val'
    assert len(read_csv(out / 'sweep.csv')) == 9


@pytest.mark.zennit_both
def test_nan_relevance_stops_the_sweep_naming_image_and_setting(setup, tmp_path):
    """A network whose first convolution is all zero (and whose biases are zero) outputs 0 in every layer; ε·std(z)
    is then 0 / 0. The sweep stops with the image and the setting instead of passing NaN on."""
    folder, data, _ = setup
    _, checkpoint = write_setup(tmp_path, phantoms=0)
    payload = torch.load(checkpoint, weights_only=True)
    payload['state_dict']['features.0.weight'].zero_()
    torch.save(payload, checkpoint)
    source = open_source(checkpoint, data, quiet=True)
    with pytest.raises(SweepError, match=r"^relevance of image 0 \('[^']+\.mat'\).* contains NaN or inf values with "
                                         r"epsilon=0.25, gamma=0.1 and \{'std_epsilon': True\}; std_epsilon=True "
                                         r'gives 0 / 0'):
        run_sweep(source, [0.25], [0.1], progress=False, composite_kwargs={'std_epsilon': True})
    run_sweep(source, [0.25], [0.1], progress=False)  # plain ε: finite (all zero), no error


# --- objectives: faithfulness and the Pareto choice ----------------------------------------------------------------

def test_pareto_front_and_choice_by_hand():
    rows = [dict(zip(('name', 'iou', 'gap'), values)) for values in [
        ('a', 0.10, 0.50),   # front: best IoU
        ('b', 0.08, 0.90),   # front
        ('c', 0.05, 1.00),   # front: best gap
        ('d', 0.07, 0.80),   # dominated by b
        ('e', 0.10, 0.40),   # dominated by a (equal IoU, lower gap)
        ('f', float('nan'), 2.0),  # undefined IoU: left out
    ]]
    assert [row['name'] for row in pareto_front(rows, ['iou', 'gap'])] == ['a', 'b', 'c']
    # scaled over the finite rows (IoU 0.05 .. 0.10, gap 0.40 .. 1.00): a → min(1, 1/6), b → min(0.6, 5/6) = 0.6,
    # c → min(0, 1) = 0: b's worse criterion is best
    best, front = pareto_choice(rows, ['iou', 'gap'])
    assert best['name'] == 'b' and len(front) == 3


@pytest.mark.zennit_both
def test_faithfulness_objective_ignores_the_masks(setup):
    """Scored by faithfulness alone (masks ignored), the choice is the setting with the largest mean validation gap,
    and no localisation column exists."""
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    chosen = run_sweep(source, (0., 1.), (0., 1.), out=str(folder / 'faithful'), progress=False, batch_size=4,
                       objective='faithfulness', criteria='faithfulness', perturbation={'steps': 4})
    assert all('val_iou' not in row and 'val_faithfulness_gap' in row for row in chosen.table)
    best = max(chosen.table, key=lambda row: row['val_faithfulness_gap'])
    assert (chosen.best['epsilon'], chosen.best['gamma']) == (best['epsilon'], best['gamma'])
    choice = json.loads((folder / 'faithful' / 'choice.json').read_text())
    assert choice['objective'] == 'faithfulness' and set(choice['test']) == {'morf_auc', 'lerf_auc',
                                                                             'faithfulness_gap'}
    assert choice['test']['faithfulness_gap']['overall']['mean'] == pytest.approx(best['test_faithfulness_gap'])
    with pytest.raises(SweepError, match='objective iou needs localisation scored, but metrics are faithfulness'):
        run_sweep(source, (0.,), (0.,), progress=False, objective='iou', criteria='faithfulness')
    with pytest.raises(SweepError, match="objective must be one of iou, faithfulness, pareto, got 'auc'"):
        run_sweep(source, (0.,), (0.,), progress=False, objective='auc')


@pytest.mark.zennit_both
def test_pareto_objective_chooses_on_the_front(setup, result):
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    chosen = run_sweep(source, EPSILONS, GAMMAS, out=str(folder / 'pareto'), progress=False, batch_size=4,
                       objective='pareto')
    assert [row['val_faithfulness_gap'] for row in chosen.table] == \
        [row['val_faithfulness_gap'] for row in result.table]  # the same scores as the IoU sweep's
    best, front = pareto_choice(chosen.table, ['val_iou', 'val_faithfulness_gap'])
    assert (chosen.best['epsilon'], chosen.best['gamma']) == (best['epsilon'], best['gamma'])
    choice = json.loads((folder / 'pareto' / 'choice.json').read_text())
    assert choice['objective'] == 'pareto' and len(choice['pareto_front']) == len(front)
    assert {'iou', 'faithfulness_gap'} <= set(choice['validation']) and 'faithfulness_gap' in choice['test']
