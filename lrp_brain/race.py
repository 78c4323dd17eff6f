"""Racing the settings of a sweep: after each round of images, the settings proved worse than another leave.

The decision is a pure function of the scores seen so far (:func:`eliminate`): paired per-image scores in, the
settings that leave out. :class:`Race` keeps the bookkeeping of a whole race (which settings are still in, in which
round each left and which setting beat it); neither touches files or tensors.

The test (:data:`TEST`): for two settings ``a`` and ``b`` scored on the same ``n`` images, ``dᵢ = aᵢ − bᵢ`` (images
where either score is undefined left out), the one-sided paired-t lower confidence bound of the mean difference is

    L(a, b) = d̄ − t₍₁₋α′, n−1₎ · s_d / √n,      α′ = (1 − confidence) / (R · (S − 1)),

with ``R`` the planned number of rounds and ``S`` the number of settings at the start. ``b`` leaves when some other
remaining setting ``a`` has ``L(a, b) > 0`` on every criterion of the objective (one criterion for ``iou`` or
``faithfulness``; for ``pareto`` both: ``b`` is then dominated with confidence).

Why the chance of ever dropping a setting ``b`` that is truly as good as every other (truly on the Pareto front,
for ``pareto``) is at most ``1 − confidence``, although the rounds look at growing, overlapping sets of images and the
leader is chosen from the same data: dropping ``b`` in round ``r`` needs some ``a`` and a criterion ``c`` with
``L_r,c(a, b) > 0`` although the true difference ``μ_c(a) − μ_c(b)`` is ``≤ 0`` (for ``pareto``: on the criterion where
``a`` does not beat ``b``). Each of these events is a lower bound missing the truth, of chance ``≤ α′`` for one fixed
``(r, a, c)`` (the bound on the first ``n_r`` images is defined whether or not it is computed). The union over the
``R`` rounds and the ``S − 1`` rivals ``a`` bounds the chance of any of them by ``R · (S − 1) · α′ = 1 − confidence``
(Bonferroni); a union bound needs no independence, so the dependence between rounds and the data-dependent choice of
which settings are compared do not matter. With ``k`` settings tied for the best, the chance that any of them leaves
is at most ``k · (1 − confidence)``.

The t bound is exact when the paired differences are normal and holds approximately (central limit) otherwise; a
setting is never dropped on fewer than two paired images.
"""
from dataclasses import dataclass, field

import numpy as np
from scipy import special

#: The statistical test, in words, as ``choice.json`` records it.
TEST = ('paired one-sided t lower confidence bound of the mean per-image difference (rival - setting) on the images '
        'both are scored on; Bonferroni-corrected over the planned rounds and the (settings - 1) rivals: alpha\' = '
        '(1 - confidence) / (rounds * (settings - 1)); a setting leaves when one remaining rival\'s bound is > 0 on '
        'every criterion of the objective (pareto: dominated with confidence)')


class RaceError(ValueError):
    """Race settings that cannot be used: the message names the parameter and value."""


def check_confidence(confidence):
    """Return ``confidence`` as a float in (0, 1), or raise :class:`RaceError` naming it."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0. < confidence < 1.:
        raise RaceError(f'confidence must be a number in (0, 1), got {confidence!r}')
    return float(confidence)


def comparison_level(confidence, rounds, settings):
    """The one-sided level α′ of each bound: ``(1 − confidence) / (rounds · (settings − 1))``."""
    return (1. - confidence) / (max(rounds, 1) * max(settings - 1, 1))


def lower_bounds(scores, rival, level):
    """The paired-t lower bounds ``L(rival, b)`` for every setting ``b``, per criterion.

    Parameters
    ----------
    scores: numpy.ndarray
        ``(C, S, n)``: criterion × setting × image, NaN where undefined (or not scored).
    rival: int
        The setting every other is compared with.
    level: float
        The one-sided level α′.

    Returns
    -------
    numpy.ndarray
        ``(C, S)``; ``-inf`` where fewer than two images pair up (and for ``rival`` itself).
    """
    differences = scores[:, rival:rival + 1, :] - scores
    paired = np.isfinite(differences)
    count = paired.sum(axis=2)
    values = np.where(paired, differences, 0.)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean = values.sum(axis=2) / count
        variance = (np.where(paired, values - mean[..., None], 0.) ** 2).sum(axis=2) / (count - 1)
        quantile = special.stdtrit(np.maximum(count - 1, 1), 1. - level)  # the t distribution's inverse
        bounds = mean - quantile * np.sqrt(variance / count)
    bounds = np.where(count >= 2, bounds, -np.inf)
    bounds[:, rival] = -np.inf
    return bounds


def eliminate(scores, active, confidence, rounds):
    """The remaining settings that leave the race after a round.

    Parameters
    ----------
    scores: array-like
        ``(C, S, n)``: the scores of every setting of the race (``S`` settings at the start) on the ``n`` images
        seen so far, per criterion of the objective (larger is better); NaN where undefined or not scored.
    active: sequence of bool
        ``(S,)``: the settings still in the race (only these are compared, and only these can leave).
    confidence: float
        In (0, 1): the chance of never dropping a setting as good as every other is at least this.
    rounds: int
        The planned number of rounds of the whole race (the correction's ``R``).

    Returns
    -------
    dict
        ``{setting index: index of the rival that beat it}`` for the settings that leave, the rival the first
        (in index order) whose bound is > 0 on every criterion.
    """
    scores = np.asarray(scores, dtype=np.float64)
    active = np.asarray(active, dtype=bool)
    level = comparison_level(check_confidence(confidence), rounds, scores.shape[1])
    beaten = {}
    for rival in np.flatnonzero(active):
        beats = (lower_bounds(scores, rival, level) > 0).all(axis=0) & active
        for setting in np.flatnonzero(beats):
            beaten.setdefault(int(setting), int(rival))
    return dict(sorted(beaten.items()))


@dataclass
class Race:
    """The state of one race over ``keys`` (the settings, in table order).

    Attributes
    ----------
    keys: list of str
    criteria: tuple of str
        The score names raced on (larger is better), as the rows of :meth:`scores` hold them.
    confidence: float
    rounds: int
        Planned rounds.
    left_round: dict
        ``{key: round}`` (1-based) for every setting that left.
    beaten_by: dict
        ``{key: rival key}`` for every setting that left.
    history: list of dict
        Per round done: ``round``, ``images`` (seen so far) and ``alive`` (settings still in after it).
    """
    keys: list
    criteria: tuple
    confidence: float
    rounds: int
    left_round: dict = field(default_factory=dict)
    beaten_by: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    @property
    def active(self):
        """The keys still in the race, in table order."""
        return [key for key in self.keys if key not in self.left_round]

    def scores(self, rows):
        """The ``(C, S, n)`` scores of ``rows`` (``row['scores'][key][criterion]``), NaN where a row has none."""
        nan = float('nan')
        return np.array([[[row['scores'].get(key, {}).get(name, nan) for row in rows] for key in self.keys]
                         for name in self.criteria], dtype=np.float64).reshape(len(self.criteria), len(self.keys),
                                                                               len(rows))

    def decide(self, scores):
        """:func:`eliminate` on ``scores`` ``(C, S, n)`` (settings in ``keys`` order): ``{key: rival key}``."""
        active = [key not in self.left_round for key in self.keys]
        return {self.keys[setting]: self.keys[rival]
                for setting, rival in eliminate(scores, active, self.confidence, self.rounds).items()}

    def record(self, images, beaten):
        """Close a round in which ``images`` images were seen in all, with the decision ``beaten`` of
        :meth:`decide`."""
        number = len(self.history) + 1
        for key, rival in beaten.items():
            self.left_round[key], self.beaten_by[key] = number, rival
        self.history.append({'round': number, 'images': images, 'alive': len(self.active)})
