"""The ε×γ sweep: every setting of a grid scored on the validation split, the best chosen there and reported on test.

The relevance of the whole grid comes from :class:`lrp_brain.sweep_engine.SweepEngine`; this module is the driver
around it: grid values, resumable row logs per split part, the summaries, the choice and its figures.

Every setting is scored by two criteria: localisation (the mean IoU of its relevance mask with the tumour mask) and
faithfulness (the mean gap LeRF − MoRF AUC of region perturbation, :mod:`lrp_brain.faithfulness`, which needs no
mask). The ``objective`` chooses by one of them, or, ``'pareto'``, among the settings no other setting beats on both
(:func:`pareto_choice`).
"""
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lrp_brain import distributed, faithfulness
from lrp_brain.contrast import ContrastError, check_contrast
from lrp_brain.evaluate import check_criteria, stack_batch
from lrp_brain.faithfulness import COLUMNS as FAITHFULNESS
from lrp_brain.metrics import METRICS
from lrp_brain.outputs import atomic_write_csv, atomic_write_json, exclusive
from lrp_brain.race import TEST as RACE_TEST, Race, RaceError, check_confidence, comparison_level
from lrp_brain.sweep_engine import SweepEngine, SweepError
from lrp_brain.versions import library_versions

# --- the sweep: every setting scored on validation, the best one chosen there and reported on test ---------------

#: The seed study's protocol, reproduced by ``lrp-brain sweep --seed-study``.
SEED_STUDY = {
    'epsilons': tuple(float(value) for value in range(-100, 101, 20)),
    'gammas': tuple(float(value) for value in range(-100, 101, 20)),
    'quantiles': (0.95,),
    'size': 256,
    'split_method': 'random',
    'split_seed': 42,
}

#: Why the seed study's protocol is biased; printed and recorded by the ``--seed-study`` preset.
SEED_STUDY_BIAS = (
    'The seed study protocol is biased: (1) its split is random over files, so slices of one patient sit in '
    'train, validation and test, and the test score is inflated by patients the model has seen; (2) it chose '
    'epsilon and gamma by their test-split IoU, so the reported best IoU is optimistic (this sweep still chooses on '
    'validation and only reports on test; the test-chosen setting is listed separately as "study_choice"); (3) '
    'negative epsilon and gamma are not LRP rules: negative gamma subtracts the positive weights, negative epsilon '
    'can cancel the denominator; (4) its z^B bounds were computed for ImageNet-normalised input although its input '
    'was min-max scaled to [0, 1] (this sweep derives them from the transform).'
)

#: The split that chooses the setting, and the split that reports it: never the other way round.
SELECT_ON, REPORT_ON = 'val', 'test'

#: What the sweep may choose by, and the table column (mean on the validation split) each one maximises.
OBJECTIVES = {'iou': 'iou', 'faithfulness': 'faithfulness_gap', 'pareto': None}

#: The per-image scores a race of each objective compares settings on.
RACED_ON = {'iou': ('iou',), 'faithfulness': ('faithfulness_gap',), 'pareto': ('iou', 'faithfulness_gap')}


@dataclass
class SweepResult:
    """What :func:`run_sweep` found.

    Attributes
    ----------
    table: list of dict
        One row per (ε, γ, quantile): the setting, and per split the mean IoU with its 95 % bootstrap interval,
        the number of images it averages and the means of the other metrics.
    best: dict
        The row of the setting the objective chose on the validation split.
    choice: dict
        What ``choice.json`` holds: the best setting, which split chose it and which reports it, the grid, the data
        and model fingerprints.
    """
    table: list
    best: dict
    choice: dict


def merge_grid(name, values):
    """The grid values ``values`` with repeats removed, in order (``-0`` is ``0``), and a note saying what was merged
    (``None`` when nothing was); a value that is not a number is left for the grid's own check to name."""
    try:
        numbers = [float(value) for value in values]
    except (TypeError, ValueError):
        return list(values), None
    unique = list(dict.fromkeys(value + 0. for value in numbers))  # -0.0 + 0.0 is 0.0, and -0.0 == 0.0
    note = None if len(unique) == len(numbers) else (
        f'note: {name} {", ".join(f"{value:g}" for value in numbers)} repeats values (-0 is 0); each setting is '
        f'computed once: {name} {", ".join(f"{value:g}" for value in unique)}')
    return unique, note


def _setting_key(epsilon, gamma, quantile):
    return f'eps={epsilon:g},gamma={gamma:g},q={quantile:g}'


def pareto_front(rows, criteria):
    """The rows no other row beats on every one of ``criteria`` (table columns, larger is better) while being better
    on one; rows with a NaN criterion are left out. In the rows' order."""
    finite = [row for row in rows if all(row[name] == row[name] for name in criteria)]

    def dominates(a, b):
        return all(a[name] >= b[name] for name in criteria) and any(a[name] > b[name] for name in criteria)

    return [row for row in finite if not any(dominates(other, row) for other in finite)]


def pareto_choice(rows, criteria, candidates=None):
    """The setting chosen among the :func:`pareto_front`: the one whose worse criterion is best, each criterion scaled
    to [0, 1] between its smallest and largest value over the whole grid (max-min: no criterion is given up for the
    other); the first in grid order among equal ones. A criterion that is the same everywhere counts as 1.

    ``candidates`` (a sublist of ``rows``, default all) restricts the front and the choice, not the scaling: a race
    chooses among the settings that stayed, scaled over every setting's mean on the images it was scored on.

    Returns
    -------
    best: dict
        The chosen row.
    front: list of dict
        The Pareto front.
    """
    front = pareto_front(rows if candidates is None else candidates, criteria)
    if not front:
        raise SweepError(f'no setting has defined {" and ".join(criteria)} on the {SELECT_ON} split')
    finite = [row for row in rows if all(row[name] is not None and row[name] == row[name] for name in criteria)]
    ranges = {name: (min(row[name] for row in finite), max(row[name] for row in finite)) for name in criteria}

    def worst(row):
        return min(1. if high == low else (row[name] - low) / (high - low) for name, (low, high) in ranges.items())

    return max(front, key=worst), front

def _score_part(source, part, engine, quantiles, *, batch_size, device, out, identity, progress,
                composite_kwargs=None, criteria=('localisation',), perturbation=None, race=None, round_batches=1,
                settings=None):
    """Score every setting on every image of one split part; return one row per image, in split order, holding
    ``{setting key: {metric: value}}`` under ``'scores'`` (the localisation metrics and the faithfulness columns, as
    ``criteria`` asks; faithfulness does not depend on the quantile).

    Only the keys ``settings`` (default: all) are scored, or with a :class:`~lrp_brain.race.Race` ``race`` only those
    still in it, the race deciding after every ``round_batches`` batches (:func:`_race_round`); the engine computes
    the (ε, γ) of these keys only."""
    from lrp_brain import metrics
    from lrp_brain.data import relative_ref

    dataset = source.dataset(part)
    keys = [relative_ref(ref, source.split.root) for ref in dataset.refs]

    def compute(indices):
        keep = set(race.active) if race is not None else None if settings is None else set(settings)
        pairs = _engine_settings(engine, quantiles, keep)
        last = {gamma_index: eps_index for eps_index, gamma_index in sorted(pairs)}  # the last ε of each γ
        batch = stack_batch(dataset, indices)
        images, masks, labels = batch['image'].to(device), batch['mask'], batch['label']
        names = [keys[i] for i in indices]
        scores = [{} for _ in indices]
        # the maps of one γ (all its ε's) are perturbed together: one stack of forward passes, on the device
        pending = []
        for eps_index, gamma_index, relevance in engine.iter_relevance(images, labels.to(device), settings=pairs):
            epsilon, gamma = engine.epsilons[eps_index], engine.gammas[gamma_index]
            if 'faithfulness' in criteria:
                pending.append((epsilon, gamma, relevance))
                if eps_index == last[gamma_index]:
                    _score_faithfulness(engine.model, images, labels, pending, perturbation, names, quantiles, scores,
                                        composite_kwargs)
                    pending = []
            if 'localisation' not in criteria:
                continue
            relevance = relevance.cpu()  # once for all quantiles
            for quantile in quantiles:
                try:
                    values = metrics.evaluate_maps(relevance, masks, quantile, names=names)
                except metrics.MetricError as error:  # NaN relevance, named by image: add the setting
                    raise _setting_error(error, epsilon, gamma, composite_kwargs) from error
                key = _setting_key(epsilon, gamma, quantile)
                for position, score in enumerate(scores):
                    score.setdefault(key, {}).update({name: float(values[name][position]) for name in METRICS})
        if keep is not None:  # an active (ε, γ) may have quantiles that left
            scores = [{key: values for key, values in score.items() if key in keep} for score in scores]
        return [{'file': keys[index], 'label': label, 'scores': score}
                for index, label, score in zip(indices, labels.tolist(), scores)]

    count = len(engine.epsilons) * len(engine.gammas) * len(quantiles) if settings is None else len(settings)
    return distributed.batch_rows(
        keys, batch_size, compute, identity={**identity, 'part': part}, progress=progress,
        log_path=None if out is None else os.path.join(out, f'{part}.rows.jsonl'),
        description=f'sweep {part} ({count} settings)',
        after_round=None if race is None else lambda rows: _race_round(race, rows), round_batches=round_batches,
    )


def _engine_settings(engine, quantiles, keys):
    """The ``(eps_index, gamma_index)`` pairs of the engine with a quantile's setting in ``keys`` (all if ``None``)."""
    return [(eps_index, gamma_index) for eps_index, epsilon in enumerate(engine.epsilons)
            for gamma_index, gamma in enumerate(engine.gammas)
            if keys is None or any(_setting_key(epsilon, gamma, quantile) in keys for quantile in quantiles)]


def _race_round(race, rows):
    """Close a round of ``race`` on the rows seen so far: rank 0 decides which settings leave (a pure function of the
    rows, so a resumed race decides as before), every process applies it."""
    beaten = distributed.on_main(lambda: race.decide(race.scores(rows)))
    race.record(len(rows), beaten)


def _setting_error(error, epsilon, gamma, composite_kwargs):
    """The metrics' or the perturbation's refusal of a map (NaN relevance, named by image) with the setting added."""
    return SweepError(
        f'{error} with epsilon={epsilon:g}, gamma={gamma:g}'
        + (f' and {composite_kwargs}' if composite_kwargs else '')
        + ('; std_epsilon=True gives 0 / 0 where a layer output is constant (e.g. an all-zero image)'
           if (composite_kwargs or {}).get('std_epsilon') else '')
    )


def _score_faithfulness(model, images, labels, maps, perturbation, names, quantiles, scores, composite_kwargs=None):
    """Add the faithfulness columns of ``maps`` (``[(ε, γ, relevance (N, C, H, W))]``, the maps of the same images)
    to ``scores``, under every quantile's key of each setting."""
    relevance = torch.stack([relevance for _, _, relevance in maps])
    try:
        columns = faithfulness.columns(model, images, relevance, labels, perturbation, names)
    except faithfulness.FaithfulnessError as error:  # NaN relevance: name the (first) setting whose map it is
        bad = next(index for index, (_, _, values) in enumerate(maps) if not torch.isfinite(values).all())
        raise _setting_error(error, maps[bad][0], maps[bad][1], composite_kwargs) from error
    for index, (epsilon, gamma, _) in enumerate(maps):
        for quantile in quantiles:
            key = _setting_key(epsilon, gamma, quantile)
            for position, score in enumerate(scores):
                score.setdefault(key, {}).update({name: values[index][position] for name, values in columns.items()})


def _summaries(rows, settings, class_names, columns):
    """Per setting and column, the summary of :func:`lrp_brain.metrics.summarize` over the rows of one part that
    score the setting (all of them, but in a race); settings no row scores are left out."""
    from lrp_brain import metrics

    summaries = {}
    for key in settings:
        scored = [row for row in rows if key in row['scores']]
        if scored:
            labels = torch.tensor([row['label'] for row in scored], dtype=torch.long)
            summaries[key] = {
                name: metrics.summarize(torch.tensor([row['scores'][key][name] for row in scored],
                                                     dtype=torch.float64), labels, class_names)
                for name in columns
            }
    return summaries


def run_sweep(source, epsilons, gammas, quantiles=(0.9,), *, out=None, batch_size=4, device='cpu', progress=True,
              allow_negative=False, notes=None, composite_kwargs=None, objective='iou', criteria='both',
              perturbation=None, contrast=None, race=False, confidence=0.95, round_batches=1):
    """Score every (ε, γ, quantile) on the validation split, choose the best there by the objective, report on test.

    The relevance comes from :class:`SweepEngine` (the same numbers as :class:`~lrp_brain.composites.VGGComposite`,
    computed for the whole grid at once) for the images' true classes, as in the study. Selection uses the
    validation split only; the test split is scored for every setting so the table shows it, but it never decides.

    Parameters
    ----------
    source: lrp_brain.sources.Source
        Model and data (see :func:`lrp_brain.sources.open_source`).
    epsilons, gammas: sequence of float
        The grid; repeated values are merged (:func:`merge_grid`; ``-0`` is ``0``).
    quantiles: sequence of float
        Thresholds of the relevance mask to sweep as well (0.9: the top 10 %), in [0, 1); merged like the grid.
    out: str, optional
        Folder for ``sweep.csv``, ``heatmap.png``, ``choice.json`` and the row logs an interrupted sweep resumes
        from; nothing is written if ``None``. Checked writable and held for the run after the grid and the split
        are checked (a second sweep on it is refused with :class:`~lrp_brain.outputs.OutputError`).
    batch_size: int
        Images per engine call.
    device: str or torch.device
    progress: bool
        Progress bars over images (per split).
    allow_negative: bool
        Accept negative ε and γ (the seed study's grid only).
    notes: str, optional
        Recorded in ``choice.json`` (the seed-study preset puts its bias statement here).
    composite_kwargs: dict, optional
        More :class:`~lrp_brain.composites.VGGComposite` options (``epsilon_from_block``, ``std_epsilon``, ...).
    objective: str
        ``'iou'`` (the highest mean validation IoU), ``'faithfulness'`` (the highest mean validation faithfulness
        gap) or ``'pareto'`` (:func:`pareto_choice` over both).
    criteria: str or sequence of str
        What is scored: ``'both'`` (default), ``'localisation'`` or ``'faithfulness'`` (for data without tumour
        masks, or to ignore them); it must include what the objective needs.
    perturbation: dict, optional
        Region-perturbation settings replacing some of :data:`lrp_brain.faithfulness.DEFAULTS`.
    contrast: str, optional
        The output relevance of every map (:mod:`lrp_brain.contrast`): ``None`` (one-hot), ``'sglrp'`` or ``'clrp'``.
    race: bool
        Race the settings on the validation split (:mod:`lrp_brain.race`): after every ``round_batches`` batches of
        ``batch_size`` images, the settings another remaining one beats with confidence on the objective's
        criterion (``pareto``: on both) leave and are no longer computed; the choice is made among the settings that
        stayed, and the test split is scored for it alone (the others' test columns are empty: nobody can pick by
        them, and they would cost what the race saved). The table gains ``val_images``, ``test_images`` (the images
        that scored each setting), ``left_round`` and ``beaten_by`` (empty for the settings that stayed);
        ``choice.json`` records the race.
    confidence: float
        In (0, 1): the chance that a setting as good as every other ever leaves is at most ``1 - confidence``.
    round_batches: int
        Batches per race round (the same in every process: under torchrun, a multiple of the processes keeps
        them all busy).

    Returns
    -------
    SweepResult
    """
    from lrp_brain import metrics

    (epsilons, _), (gammas, _), (quantiles, _) = (merge_grid(name, values) for name, values in (
        ('epsilons', epsilons), ('gammas', gammas), ('quantiles', quantiles)))
    if not quantiles:
        raise SweepError('quantiles is empty; the sweep needs at least one value')
    try:  # the quantile 1 selects no pixel: refused, so it is never chosen
        quantiles = tuple(metrics.check_selection_quantile(value) for value in quantiles)
    except metrics.MetricError as error:
        raise SweepError(f'quantiles: {error}') from None
    if objective not in OBJECTIVES:
        raise SweepError(f'objective must be one of {", ".join(OBJECTIVES)}, got {objective!r}')
    criteria = check_criteria(criteria, source.has_masks)
    needed = {'iou': ('localisation',), 'faithfulness': ('faithfulness',), 'pareto': CRITERIA_OF_PARETO}[objective]
    if not set(needed) <= set(criteria):
        raise SweepError(f'objective {objective} needs {" and ".join(needed)} scored, but metrics are '
                         f'{" and ".join(criteria)} only')
    perturbation = faithfulness.settings(perturbation) if 'faithfulness' in criteria else None
    columns = (METRICS if 'localisation' in criteria else ()) + (FAITHFULNESS if 'faithfulness' in criteria else ())
    for part in (SELECT_ON, REPORT_ON):
        if not getattr(source.split, part):
            raise SweepError(f'the {part} split of {source.data} is empty; the sweep needs images to choose on '
                             f'({SELECT_ON}) and to report on ({REPORT_ON}): use more data or another split')
    if race:
        try:
            confidence = check_confidence(confidence)
        except RaceError as error:
            raise SweepError(str(error)) from None
        if isinstance(round_batches, bool) or not isinstance(round_batches, int) or round_batches < 1:
            raise SweepError(f'round_batches must be an integer >= 1, got {round_batches!r}')
    try:
        contrast = check_contrast(contrast, 'lrp', len(source.class_names))
    except ContrastError as error:
        raise SweepError(str(error)) from error
    low, high = source.bounds
    model = source.model.to(device).eval()
    engine = SweepEngine(model, epsilons, gammas, _to(low, device), _to(high, device),
                         allow_negative=allow_negative, contrast=contrast, **(composite_kwargs or {}))
    settings = [_setting_key(epsilon, gamma, quantile) for epsilon in engine.epsilons for gamma in engine.gammas
                for quantile in quantiles]
    grid = {'epsilons': list(engine.epsilons), 'gammas': list(engine.gammas), 'quantiles': list(quantiles),
            'composite_kwargs': composite_kwargs or {}, **source.bounds_record(),
            'input_size': source.transform.size, 'target': 'label', 'criteria': list(criteria),
            'perturbation': perturbation, 'contrast': contrast}
    identity = {'grid': grid, 'model': source.model_id, 'batch_size': batch_size}

    def build_table():
        """One row per setting: its means (and criteria intervals) per split scored so far; a race adds how many
        images scored each setting per split, the round it left and the rival that beat it."""
        table = []
        for epsilon in engine.epsilons:
            for gamma in engine.gammas:
                for quantile in quantiles:
                    key = _setting_key(epsilon, gamma, quantile)
                    row = {'epsilon': epsilon, 'gamma': gamma, 'quantile': quantile}
                    for part in (SELECT_ON, REPORT_ON):
                        for name in columns:  # a setting a race left out of a split gets empty columns there
                            scored = summaries.get(part, {})
                            overall = scored[key][name]['overall'] if key in scored else \
                                dict.fromkeys(('mean', 'ci_low', 'ci_high', 'n', 'excluded'))
                            row[f'{part}_{name}'] = overall['mean']
                            if name in CRITERION_COLUMNS:  # the criteria get their intervals and counts (the IoU's
                                counted = part if name == 'iou' else f'{part}_{name}'  # under their first names)
                                row.update({f'{part}_{name}_ci_low': overall['ci_low'],
                                            f'{part}_{name}_ci_high': overall['ci_high'],
                                            f'{counted}_n': overall['n'], f'{counted}_excluded': overall['excluded']})
                    if racing is not None:
                        row.update({f'{part}_images': images.get(part, Counter())[key] for part in (SELECT_ON,
                                                                                                     REPORT_ON)})
                        row.update(left_round=racing.left_round.get(key), beaten_by=racing.beaten_by.get(key))
                    table.append(row)
        return table

    def best_by(table, part, name, rows=None):
        column = f'{part}_{name}'
        finite = [row for row in (table if rows is None else rows)
                  if row[column] is not None and row[column] == row[column]]
        if not finite:
            raise SweepError(f'no setting has a defined mean {name} on the {part} split (every image excluded)')
        return max(finite, key=lambda row: row[column])  # the first of equal rows, in grid order

    def choose(table):
        """The objective's choice on validation, among the settings that stayed in a race; and the Pareto front."""
        stayed = table if racing is None else [row for row in table if row['left_round'] is None]
        if objective == 'pareto':
            return pareto_choice(table, [f'{SELECT_ON}_{name}' for name in CRITERION_COLUMNS], stayed)
        return best_by(table, SELECT_ON, OBJECTIVES[objective], stayed), None

    racing = None
    if race:
        batches = -(-len(source.split.val) // batch_size)
        racing = Race(settings, tuple(RACED_ON[objective]), confidence, -(-batches // round_batches))
        identity['race'] = {'confidence': confidence, 'round_batches': round_batches, 'objective': objective}
    summaries, images = {}, {}
    # the output folder is checked writable and held while the rows are computed: a second run on it is refused
    with nullcontext() if out is None else distributed.held_by_main(
            lambda: exclusive(os.path.join(out, '.lock'), f'the output folder {out}')):
        for part in (SELECT_ON, REPORT_ON):
            scored = None
            if racing is not None and part == REPORT_ON:  # a race reports its choice alone on test
                chosen = choose(build_table())[0]
                scored = [_setting_key(chosen['epsilon'], chosen['gamma'], chosen['quantile'])]
            rows = _score_part(source, part, engine, quantiles, batch_size=batch_size, device=device, out=out,
                               identity={**identity, 'data': source.data_id(part),
                                         **({} if scored is None else {'settings': scored})}, progress=progress,
                               composite_kwargs=composite_kwargs, criteria=criteria, perturbation=perturbation,
                               race=racing if part == SELECT_ON else None, round_batches=round_batches,
                               settings=scored)
            summaries[part] = _summaries(rows, settings, source.class_names, columns)
            images[part] = Counter(key for row in rows for key in row['scores'])  # images scored, per setting
    table = build_table()
    best, front = choose(table)
    best_key = _setting_key(best['epsilon'], best['gamma'], best['quantile'])
    criterion_columns = [name for name in CRITERION_COLUMNS if name in columns]
    choice = {
        'best': {'epsilon': best['epsilon'], 'gamma': best['gamma'], 'quantile': best['quantile']},
        'objective': objective,
        'selected_on': SELECT_ON,
        'reported_on': REPORT_ON,
        'validation': {name: summaries[SELECT_ON][best_key][name] for name in criterion_columns},
        'test': {name: summaries[REPORT_ON][best_key][name] for name in columns},
        'grid': grid,
        'split': {'method': source.split.method, 'seed': source.split.seed,
                  'sizes': {part: len(getattr(source.split, part)) for part in ('train', 'val', 'test')}},
        'model': source.model_id,
        'data': {'source': source.data, **{part: source.data_id(part) for part in (SELECT_ON, REPORT_ON)}},
        'versions': library_versions(),
        'processes': distributed.world_size(),
    }
    if front is not None:
        choice['pareto_front'] = [{'epsilon': row['epsilon'], 'gamma': row['gamma'], 'quantile': row['quantile'],
                                   **{name: row[f'{SELECT_ON}_{name}'] for name in CRITERION_COLUMNS}}
                                  for row in front]
        choice['pareto_rule'] = ('among the settings no other beats on both validation criteria, the one whose worse '
                                 'criterion, each scaled to [0, 1] over the grid, is best (max-min)')
    if racing is not None:
        choice['race'] = _race_record(racing, images, len(settings), round_batches, batch_size)
    if notes:
        study = best_by(table, REPORT_ON, 'iou')
        choice['notes'] = notes
        choice['study_choice'] = {'epsilon': study['epsilon'], 'gamma': study['gamma'],
                                  'quantile': study['quantile'], 'test_iou': study[f'{REPORT_ON}_iou'],
                                  'why_not_used': 'chosen on the test split, as the seed study did: optimistic'}
    if out is not None:
        distributed.on_main(lambda: _write_outputs(out, table, choice, engine, quantiles, best, criterion_columns))
    return SweepResult(table, best, choice)


def _race_record(race, images, settings, round_batches, batch_size):
    """What ``choice.json`` says of a race: its test, rounds, the settings left after each, and the (image, setting)
    evaluations done against those of the full grid."""
    done = {part: sum(counts.values()) for part, counts in images.items()}
    split = {part: max(counts.values(), default=0) for part, counts in images.items()}
    full = {part: split[part] * settings for part in images}
    return {
        'confidence': race.confidence,
        'criteria': list(race.criteria),
        'test': RACE_TEST,
        'alpha_per_comparison': comparison_level(race.confidence, race.rounds, settings),
        'rounds': race.rounds,
        'round_batches': round_batches,
        'batch_size': batch_size,
        'history': race.history,
        'stayed': len(race.active),
        'test_scored_for': 'the chosen setting only (the others\' test columns are empty)',
        'evaluations': {**done, 'total': sum(done.values())},
        'full_grid_evaluations': {**full, 'total': sum(full.values())},
        'fraction_of_full_grid': sum(done.values()) / max(sum(full.values()), 1),
    }


#: The criteria's columns, and what their heatmaps are called.
CRITERION_COLUMNS = {'iou': 'mean IoU', 'faithfulness_gap': 'mean faithfulness gap (LeRF − MoRF AUC)'}

#: What the Pareto objective needs scored.
CRITERIA_OF_PARETO = ('localisation', 'faithfulness')


def _write_outputs(out, table, choice, engine, quantiles, best, criterion_columns):
    """Write ``sweep.csv``, ``choice.json`` and, per quantile, one figure with a heatmap of each criterion's mean on
    the validation split side by side."""
    from lrp_brain.figures import sweep_heatmap

    atomic_write_csv(os.path.join(out, 'sweep.csv'), table)
    atomic_write_json(os.path.join(out, 'choice.json'), choice)
    for quantile in quantiles:
        panels = {
            CRITERION_COLUMNS[name]: [[next(row[f'{SELECT_ON}_{name}'] for row in table if row['epsilon'] == epsilon
                                            and row['gamma'] == gamma and row['quantile'] == quantile)
                                       for gamma in engine.gammas] for epsilon in engine.epsilons]
            for name in criterion_columns
        }
        name = 'heatmap.png' if quantile == best['quantile'] else f'heatmap_q{quantile:g}.png'
        cell = (engine.epsilons.index(best['epsilon']), engine.gammas.index(best['gamma'])) \
            if quantile == best['quantile'] else None
        sweep_heatmap(os.path.join(out, name), engine.epsilons, engine.gammas, panels, best=cell,
                      title=f'validation split, quantile {quantile:g}, chosen by {choice["objective"]}')


def _to(bound, device):
    return bound.to(device) if isinstance(bound, torch.Tensor) else bound
