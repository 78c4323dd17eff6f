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

from lrp_brain import sweep_engine
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
    # 0 and 1 trade off; 2 is dominated by 0 on IoU only and by 1 on the gap only, but by 3 on both
    assert eliminate(np.stack([iou, gap]), [True] * 4, 0.95, 1) == {0: 3, 1: 3, 2: 3}
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
    for eps_index, gamma_index, relevance in yielded:
        assert torch.equal(relevance, full[eps_index, gamma_index])
    # above the boundary: the three ε's asked for, in chunks of 2; below: γ 0 (one ε) and γ 1 (three ε's, 2 + 1)
    assert propagated == [('above', 2), ('above', 1), ('below', 1), ('below', 2), ('below', 1)]
    with pytest.raises(SweepError, match=r'settings: \(4, 0\) is not an \(eps_index, gamma_index\) of the 4x3 grid'):
        list(engine.iter_relevance(images, targets, settings=[(4, 0)]))


# --- the raced sweep against the full one ---------------------------------------------------------------------------

#: 11 values over five decades: an 11×11 grid whose settings differ enough for a race on a few dozen images.
GRID = (0., 0.001, 0.01, 0.03, 0.1, 0.3, 1., 3., 10., 30., 100.)
