"""Racing sweep: the decision rule against hand-computed bounds and its error rate over many seeded races, the
engine skipping the settings that left, and the raced sweep against the full one (choice, work, resume, torchrun)."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lrp_brain import faithfulness, sweep_engine
from lrp_brain.model import DEMO_MODEL_PATH
from lrp_brain.phantom import write_phantoms
from lrp_brain.race import RaceError, comparison_level, eliminate, lower_bounds
from lrp_brain.sources import open_source
from lrp_brain.sweep import SweepError, run_sweep
from lrp_brain.sweep_engine import SweepEngine

from command_setup import ENVIRONMENT, read_csv, run, write_setup

# --- the decision rule ----------------------------------------------------------------------------------------------


def test_lower_bound_by_hand():
    """d = (1, 2, 3): mean 2, sd 1, n 3; the one-sided 95 % t quantile with 2 degrees of freedom is 2.919986 (tables),
    so L = 2 − 2.919986 / √3 = 0.314150. Two settings and one round leave α′ = 0.05 uncorrected."""
    scores = np.array([[[4., 5., 6.], [3., 3., 3.]]])
    assert comparison_level(0.95, 1, 2) == pytest.approx(0.05)
    bounds = lower_bounds(scores, 0, 0.05)
    assert bounds[0, 1] == pytest.approx(2 - 2.919986 / 3 ** .5, abs=1e-6)
    assert bounds[0, 0] == -np.inf
    # Bonferroni: 5 rounds and 11 settings give α′ = 0.05 / 50 = 0.001, the quantile t(0.999, 2) = 22.327 (tables)
    assert comparison_level(0.95, 5, 11) == pytest.approx(0.001)
    assert lower_bounds(scores, 0, 0.001)[0, 1] == pytest.approx(2 - 22.3271 / 3 ** .5, abs=1e-3)


def test_eliminate_by_hand():
    rng = np.random.default_rng(0)
    base = rng.normal(size=20)
    scores = np.stack([base + 1., base + 1., base + 0.2 * rng.normal(size=20), base + 1. + 1e-3 * rng.normal(size=20)])
    # setting 2 is a full point worse on every image: it leaves, beaten by the first rival in index order
    assert eliminate(scores[None], [True] * 4, 0.95, 1) == {2: 0}
    # only remaining settings compare and leave
    assert eliminate(scores[None], [False, True, True, False], 0.95, 1) == {2: 1}
    assert eliminate(scores[None], [True, True, False, True], 0.95, 1) == {}
    # one paired image decides nothing; NaN images are left out of the pairs
    assert eliminate(scores[None, :, :1], [True] * 4, 0.95, 1) == {}
    holes = scores.copy()
    holes[2, 4:] = np.nan
    assert eliminate(holes[None], [True] * 4, 0.95, 1) == {2: 0}  # 4 images: still a full point, sd ~0.3
    holes[2, 1:] = np.nan
    assert eliminate(holes[None], [True] * 4, 0.95, 1) == {}
    with pytest.raises(RaceError, match='confidence must be a number in'):
        eliminate(scores[None], [True] * 4, 1., 1)


def test_pareto_leaves_only_when_dominated_on_both():
    rng = np.random.default_rng(1)
    noise = lambda: 0.05 * rng.normal(size=30)  # noqa: E731
    iou = np.stack([1 + noise(), 0 + noise(), 0 + noise(), 1 + noise()])
    gap = np.stack([0 + noise(), 1 + noise(), 0 + noise(), 1 + noise()])
    # 0 and 1 trade off; 2 is beaten by 0 on IoU only and by 1 on the gap only, but by 3 on both; 3 beats 0 and 1
    # on one criterion each and ties them on the other: they stay
    assert eliminate(np.stack([iou, gap]), [True] * 4, 0.95, 1) == {2: 3}
    assert eliminate(np.stack([iou, gap]), [True, True, True, False], 0.95, 1) == {}


def race_once(rng, means, rounds, images_per_round, told_rounds, confidence=0.95):
    """One race of settings with true means ``means``: per image a shared difficulty (the pairing) plus independent
    noise, N(0, 1) each; returns the set of settings that left."""
    count = len(means)
    scores = rng.normal(size=(1, 1, rounds * images_per_round)) + rng.normal(size=(1, count, rounds * images_per_round))
    scores += np.asarray(means)[None, :, None]
    active = np.ones(count, dtype=bool)
    for round_ in range(1, rounds + 1):
        for setting in eliminate(scores[:, :, :round_ * images_per_round], active, confidence, told_rounds):
            active[setting] = False
    return set(np.flatnonzero(~active))


@pytest.mark.parametrize('shape', ['normal', 'bounded'])
def test_equal_settings_stay_at_the_stated_rate(shape):
    """Settings 0 and 1 are equal in truth (and the best); 2..5 are worse. Over 1000 seeded races of 6 rounds, each
    of 0 and 1 leaves in at most 5 % of the races (+3 binomial standard errors). Told a single round instead (the
    correction for repeated looks left out), two equal settings leave more often than 5 %: the count can fail."""
    races, alpha = 1000, 0.05
    slack = 3 * (alpha * (1 - alpha) / races) ** .5
    rng = np.random.default_rng(12345)
    means = [0., 0., -0.3, -0.6, -1., -2.]
    left = [race_once(rng, means, 6, 8, 6) for _ in range(races)]
    if shape == 'bounded':  # IoU-like scores in [0, 1], skewed: a Beta per image, paired by a shared draw
        left = []
        for _ in range(races):
            shared = rng.beta(2, 8, size=48)
            scores = np.clip(shared[None] + 0.1 * rng.normal(size=(6, 48)) + np.array(means)[:, None] * 0.1, 0, 1)
            active = np.ones(6, dtype=bool)
            for round_ in range(1, 7):
                for setting in eliminate(scores[None, :, :round_ * 8], active, 1 - alpha, 6):
                    active[setting] = False
            left.append(set(np.flatnonzero(~active)))
    for setting in (0, 1):
        assert sum(setting in gone for gone in left) / races <= alpha + slack
    assert sum(bool({0, 1} & gone) for gone in left) / races <= 2 * alpha + slack
    # the worse settings do leave (power): the worst nearly always
    assert sum(5 in gone for gone in left) / races > 0.9
    if shape == 'normal':
        uncorrected = [race_once(rng, [0., 0.], 6, 8, 1) for _ in range(races)]
        assert sum(0 in gone for gone in uncorrected) / races > alpha + slack


# --- the engine computes the settings asked for only ----------------------------------------------------------------

def test_engine_subset_skips_the_work_of_other_settings(monkeypatch):
    torch.manual_seed(0)
    from lrp_brain.model import vgg16_small

    model = vgg16_small(width=4).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight)
            torch.nn.init.normal_(module.bias, std=0.05)
    images, targets = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    engine = SweepEngine(model, (0., 0.1, 1., 10.), (0., 0.25, 1.), 0., 1., settings_chunk=2)
    full = engine.relevance(images, targets)
    propagated = []
    original = sweep_engine._propagate

    def counting(steps, relevance, epsilon):
        propagated.append(('above' if epsilon is not None else 'below', relevance.shape[0]))
        return original(steps, relevance, epsilon)

    monkeypatch.setattr(sweep_engine, '_propagate', counting)
    wanted = [(3, 0), (1, 2), (3, 2), (0, 2)]  # ε 0.1 and 10 for γ 0 / 1, nothing of γ 0.25 or of ε 1
    yielded = list(engine.iter_relevance(images, targets, settings=wanted))
    assert [(e, g) for e, g, _ in yielded] == [(3, 0), (0, 2), (1, 2), (3, 2)]  # γ by γ, ε by ε
    for eps_index, gamma_index, relevance in yielded:  # other chunks batch the convolutions otherwise: rounding
        expected = full[eps_index, gamma_index]
        torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # above the boundary: the three ε's asked for, in chunks of 2; below: γ 0 (one ε) and γ 1 (three ε's, 2 + 1)
    assert propagated == [('above', 2), ('above', 1), ('below', 1), ('below', 2), ('below', 1)]
    with pytest.raises(SweepError, match=r'settings: \(4, 0\) is not an \(eps_index, gamma_index\) of the 4x3 grid'):
        list(engine.iter_relevance(images, targets, settings=[(4, 0)]))


# --- the raced sweep against the full one ---------------------------------------------------------------------------

#: The cheap setup of the resume and torchrun races: 11 values over five decades for both ε and γ.
GRID = (0., 0.001, 0.01, 0.03, 0.1, 0.3, 1., 3., 10., 30., 100.)

#: 240 phantoms give 48 validation and 38 test images; batches of 10 make 5 rounds.
PHANTOMS, BATCH = 240, 10

#: The 11×11 grid the choices are raced on: ε over five decades; γ from −0.9 to 10. The seed study swept negative γ
#: too (−100 … 100 in steps of 20), but there |γ| ≫ 1 makes ``w + γ·w⁺`` the z⁺ rule again, numerator and denominator
#: alike; in (−1, 0) it shrinks the excitatory weights (``(1 + γ)·w⁺ + w⁻``), and the maps change most: the mean
#: validation gap falls from 0.93 (γ ≥ 0) to −0.18 at γ = −0.75. With γ over five decades like ε instead, the settings'
#: gaps lie within a few hundredths and every race keeps most of them (measured on these images: 54 % of the work for
#: faithfulness, 56 % for pareto), so these clearly worse settings are what a race can show its savings on.
EPSILONS = GRID
GAMMAS = (-0.9, -0.75, -0.5, -0.25, -0.1, 0., 0.03, 0.1, 0.25, 1., 10.)

#: Short perturbation curves of 16 × 16 patches (16 of them at 64 px) keep the faithfulness races affordable here.
PERTURBATION = {'steps': 4, 'patch_size': 16}

#: How the full sweep's table chooses under each objective (the Pareto choice is the full sweep's own).
FULL_CHOICE = {
    'iou': lambda full: max(full.table, key=lambda row: row['val_iou']),
    'faithfulness': lambda full: max(full.table, key=lambda row: row['val_faithfulness_gap']),
    'pareto': lambda full: full.best,
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Phantoms and a random (He-initialised) small VGG16: cheap, for the races scored by IoU alone."""
    folder = tmp_path_factory.mktemp('race')
    return (folder, *write_setup(folder, phantoms=PHANTOMS, data_seed=7, model_seed=1, he_init=True))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """The demo model (trained on phantoms, 64 px input) and 240 phantoms of 256 px, which it classifies (all 48
    validation images right, the target logit ≥ 3.1). A random model's maps are no more faithful than chance whatever
    the setting, and phantoms written at 64 px are foreign to the demo model (it gets 69 % of them right; a target
    logit near 0 then inflates the normalised AUCs to ±20): neither leaves a race anything true to find."""
    folder = tmp_path_factory.mktemp('race_trained')
    write_phantoms(folder / 'phantoms', PHANTOMS, seed=7, sizes=(256,), quiet=True)
    return folder, str(folder / 'phantoms'), str(DEMO_MODEL_PATH)


@pytest.fixture(scope='module')
def full(trained):
    """The full 11×11 sweep, both criteria scored: it gives the full choice of every objective."""
    folder, data, checkpoint = trained
    return run_sweep(open_source(checkpoint, data, quiet=True), EPSILONS, GAMMAS, progress=False, batch_size=BATCH,
                     objective='pareto', perturbation=PERTURBATION, allow_negative=True)


#: The objectives raced, what is scored for each, and the largest share of the full grid's (image, setting)
#: evaluations the race may do: the issue's half.
RACES = [('iou', 'localisation', 0.5), ('faithfulness', 'faithfulness', 0.5), ('pareto', 'both', 0.5)]


@pytest.mark.parametrize('objective, criteria, share', RACES)
def test_race_chooses_as_the_full_sweep_with_less_work(trained, full, objective, criteria, share, monkeypatch):
    folder, data, checkpoint = trained
    source = open_source(checkpoint, data, quiet=True)
    maps, perturbed = [], []
    original_relevance, original_columns = SweepEngine.iter_relevance, faithfulness.columns

    def counted_relevance(engine, *arguments, **options):
        for item in original_relevance(engine, *arguments, **options):
            maps.append(item[2].shape[0])
            yield item

    def counted_columns(model, images, relevance, *arguments, **options):
        perturbed.append(relevance.shape[0] * relevance.shape[1])
        return original_columns(model, images, relevance, *arguments, **options)

    monkeypatch.setattr(SweepEngine, 'iter_relevance', counted_relevance)
    monkeypatch.setattr(faithfulness, 'columns', counted_columns)
    out = folder / f'race_{objective}'
    raced = run_sweep(source, EPSILONS, GAMMAS, out=str(out), progress=False, batch_size=BATCH, objective=objective,
                      criteria=criteria, perturbation=PERTURBATION, race=True, allow_negative=True)
    expected = FULL_CHOICE[objective](full)
    assert (raced.best['epsilon'], raced.best['gamma']) == (expected['epsilon'], expected['gamma'])

    record = raced.choice['race']
    validation, test = len(source.split.val), len(source.split.test)
    assert record['full_grid_evaluations'] == {'val': validation * 121, 'test': test * 121,
                                               'total': (validation + test) * 121}
    assert record['evaluations']['total'] <= share * record['full_grid_evaluations']['total']
    # the skipped work is skipped: one relevance map (and, scored, one perturbation) per evaluation, no more
    assert sum(maps) == record['evaluations']['total']
    assert sum(perturbed) == (record['evaluations']['total'] if criteria != 'localisation' else 0)
    assert record['rounds'] == 5 and [entry['images'] for entry in record['history']] == [10, 20, 30, 40, 48]

    table = read_csv(out / 'sweep.csv')
    assert sum(int(row['val_images']) for row in table) == record['evaluations']['val']
    chosen = [row for row in table if row['test_images'] == str(test)]
    assert len(chosen) == 1 and (float(chosen[0]['epsilon']), float(chosen[0]['gamma'])) == \
        (expected['epsilon'], expected['gamma'])
    column = 'test_iou' if criteria != 'faithfulness' else 'test_faithfulness_gap'
    assert all(row[column] == '' and row['test_images'] == '0' for row in table if row is not chosen[0])
    for row in table:  # a setting that stayed saw every validation image; one that left, the rounds until it left
        if row['left_round'] == '':
            assert row['val_images'] == str(validation) and row['beaten_by'] == ''
        else:
            assert int(row['val_images']) == record['history'][int(row['left_round']) - 1]['images']
            rival = next(other for other in table if f'eps={float(other["epsilon"]):g},gamma='
                         f'{float(other["gamma"]):g},q={float(other["quantile"]):g}' == row['beaten_by'])
            assert rival['left_round'] == '' or int(rival['left_round']) >= int(row['left_round'])
    assert record['stayed'] == sum(row['left_round'] == '' for row in table) == record['history'][-1]['alive']


def race_command(data, checkpoint, out, *extra):
    return [sys.executable, '-m', 'lrp_brain', 'sweep', '--data', data, '--checkpoint', checkpoint, '--out', str(out),
            '--eps', ','.join(map(str, GRID)), '--gamma', ','.join(map(str, GRID)), '--metrics', 'localisation',
            '--batch-size', str(BATCH), '--device', 'cpu', '--quiet', '--race', *extra]


def test_killed_race_resumes_to_the_same_table(setup):
    """Killed after its second round, a race resumes from the row log: the eliminations are decided again from the
    logged rows, and the table and the race record are those of an uninterrupted race."""
    folder, data, checkpoint = setup
    reference = subprocess.run(race_command(data, checkpoint, folder / 'uninterrupted'), capture_output=True,
                               text=True, env=ENVIRONMENT)
    assert reference.returncode == 0, reference.stderr
    assert 'race:' in reference.stdout
    out = folder / 'killed'
    process = subprocess.Popen(race_command(data, checkpoint, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ENVIRONMENT)
    log = out / 'val.rows.jsonl'
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2 * BATCH:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / 'sweep.csv').exists(), 'the race finished before it could be killed'
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert 2 * BATCH <= len(logged) < 48
    finished = subprocess.run(race_command(data, checkpoint, out), capture_output=True, text=True, env=ENVIRONMENT)
    assert finished.returncode == 0, finished.stderr
    assert read_csv(out / 'sweep.csv') == read_csv(folder / 'uninterrupted' / 'sweep.csv')
    race = json.loads((out / 'choice.json').read_text())['race']
    assert race == json.loads((folder / 'uninterrupted' / 'choice.json').read_text())['race']
    # every logged row holds the settings that were still in the race when it was computed
    alive = [121] + [entry['alive'] for entry in race['history']]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [len(row['scores']) for row in rows] == [alive[index // BATCH] for index in range(len(rows))]


def test_race_in_two_processes_equals_one(setup):
    folder, data, checkpoint = setup
    arguments = race_command(data, checkpoint, folder / 'one', '--round-batches', '2')[1:]
    run(arguments)
    run([*arguments[:arguments.index('--out') + 1], str(folder / 'two'), *arguments[arguments.index('--out') + 2:]],
        processes=2)
    assert read_csv(folder / 'two' / 'sweep.csv') == read_csv(folder / 'one' / 'sweep.csv')
    one, two = (json.loads((folder / name / 'choice.json').read_text()) for name in ('one', 'two'))
    assert two.pop('processes') == 2 and one.pop('processes') == 1
    assert two == one and one['race']['rounds'] == 3


def test_race_settings_are_checked_before_any_work(setup, tmp_path):
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    with pytest.raises(SweepError, match=r'confidence must be a number in \(0, 1\), got 1.5'):
        run_sweep(source, (0.,), (0.,), out=str(tmp_path / 'bad'), race=True, confidence=1.5)
    with pytest.raises(SweepError, match='round_batches must be an integer >= 1, got 0'):
        run_sweep(source, (0.,), (0.,), out=str(tmp_path / 'bad'), race=True, round_batches=0)
    assert not (tmp_path / 'bad').exists()


# --- the study's cost -----------------------------------------------------------------------------------------------

def test_study_cost_by_hand():
    """1 ms relevance and 3 ms faithfulness per (image, setting) at batch 2 (the rows hold the batch's seconds); a
    curve that keeps half the settings after 10 images and a quarter after 20, on 40 validation images."""
    from lrp_brain.bench import BenchResult, BenchRow, study_cost

    rows = tuple(BenchRow(name, seconds, seconds, 1., 1.) for name, seconds in
                 (('gradient', 1.), ('lrp_brain sweep', 0.002), ('faithfulness MoRF+LeRF', 0.006)))
    result = BenchResult(rows, 'cpu', {'batch': 2}, {})
    cost = study_cost(result, ((10, 0.5), (20, 0.25)), settings=100, images=40, test_images=30)
    assert (cost.relevance_seconds, cost.faithfulness_seconds) == (0.001, 0.003)
    assert cost.full_hours == pytest.approx(70 * 100 * 0.004 / 3600)
    # validation: 10 images × 100 settings + 10 × 50 + 20 × 25 = 2000 evaluations; test: 30 for the chosen one
    assert cost.race_hours == pytest.approx((2000 + 30) * 0.004 / 3600)
    assert cost.race_fraction == pytest.approx(2030 / 7000)
