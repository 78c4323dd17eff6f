"""How well relevance maps land on the tumour and how faithful they are to the model, over a dataset split: the loop
behind ``lrp-brain evaluate``.

For every image of a split the model is explained (LRP with :class:`~lrp_brain.composites.VGGComposite`, or a
baseline), the map is scored against the tumour mask with :func:`lrp_brain.metrics.evaluate_maps` (localisation) and
by region perturbation with :func:`lrp_brain.faithfulness.morf_lerf` (faithfulness: MoRF and LeRF AUC and their
gap), and one row is written per image. The summary holds means, standard deviations and bootstrap confidence
intervals, overall and per class, and counts the images left out of each mean and why. A killed run resumes from its
row log (see :mod:`lrp_brain.outputs`); the result does not depend on where it was interrupted.

The model and the data are opened by :mod:`lrp_brain.sources`.
"""
import math
import os
from contextlib import nullcontext

import torch

from lrp_brain import distributed, faithfulness, metrics
from lrp_brain.data import DataError, relative_ref
from lrp_brain.explain import ExplainError, check_options, explain
from lrp_brain.metrics import FLAGS, METRICS
from lrp_brain.outputs import atomic_write_csv, atomic_write_json, exclusive
from lrp_brain.versions import library_versions

#: What ``criteria`` may name: where the map lies (against the tumour mask) and whether it is faithful to the model.
CRITERIA = ('localisation', 'faithfulness')


def stack_batch(dataset, indices):
    """The dataset's items at ``indices`` stacked into one batch: ``image`` (N, C, S, S), ``mask`` (N, S, S, see
    :func:`stack_masks`), ``label`` (N,), and the lists ``patient`` and ``path``."""
    items = [dataset[index] for index in indices]
    return {
        'image': torch.stack([item['image'] for item in items]),
        'mask': stack_masks(items),
        'label': torch.tensor([item['label'] for item in items]),
        'patient': [item['patient'] for item in items],
        'path': [item['path'] for item in items],
    }


def stack_masks(items):
    """The dataset items' masks as one (N, S, S) tensor; an image without a mask gets an empty one, so its
    localisation metrics are NaN (flagged ``empty_mask``) and left out of their means."""
    return torch.stack([torch.zeros(item['image'].shape[-2:]) if item['mask'] is None else item['mask']
                        for item in items])


def check_criteria(criteria, masks=True):
    """``criteria`` as a tuple of :data:`CRITERIA` in their order: a name, ``'both'``, or a sequence of names.

    For data without tumour masks (``masks=False``: an image folder without them) ``'both'`` is faithfulness only,
    and localisation is refused."""
    names = (CRITERIA if masks else ('faithfulness',)) if criteria == 'both' else \
        (criteria,) if isinstance(criteria, str) else tuple(criteria)
    unknown = [name for name in names if name not in CRITERIA]
    if unknown or not names:
        raise ExplainError(f'metrics must be localisation, faithfulness or both, got {criteria!r}')
    if not masks and 'localisation' in names:
        raise ExplainError('the data has no tumour masks, so localisation cannot be scored: use metrics '
                           'faithfulness')
    return tuple(name for name in CRITERIA if name in names)


def score_rows(batch, explanation, quantile, class_names, root, faithful=None):
    """Turn one explained batch into per-image rows: file, patient, label, prediction, probabilities, metrics.

    ``quantile`` ``None`` leaves the localisation metrics out; ``faithful`` (:func:`lrp_brain.faithfulness.columns`)
    adds the faithfulness columns."""
    scores = {} if quantile is None else \
        metrics.evaluate_maps(explanation.relevance, batch['mask'], quantile, names=batch['path'])
    rows = []
    for index, path in enumerate(batch['path']):
        label = int(batch['label'][index])
        row = {
            'file': relative_ref(path, root),
            'patient': batch['patient'][index],
            'label': class_names[label],
            'prediction': class_names[int(explanation.predictions[index])],
            'target': class_names[int(explanation.targets[index])],
            **{f'p_{name}': float(explanation.probabilities[index, position])
               for position, name in enumerate(class_names)},
            **{name: float(scores[name][index]) for name in METRICS if scores},
            **{name: bool(scores[name][index]) for name in FLAGS if scores},
            **{name: values[index] for name, values in (faithful or {}).items()},
        }
        rows.append(row)
    return rows


def summarize_rows(rows, class_names, seed=0):
    """Means, standard deviations and 95 % bootstrap intervals of every metric, overall and per class.

    NaN values (metrics undefined for an image, see :mod:`lrp_brain.metrics`) are left out and counted; ``excluded``
    says how many images were left out of each mean and the flags why.
    """
    classes = torch.tensor([class_names.index(row['label']) for row in rows], dtype=torch.long)
    columns = [name for name in METRICS + faithfulness.COLUMNS if rows and name in rows[0]]
    summary = {
        name: metrics.summarize(
            torch.tensor([row[name] for row in rows], dtype=torch.float64), classes, class_names, seed=seed
        ) for name in columns
    }
    summary['images'] = len(rows)
    if rows and FLAGS[0] in rows[0]:
        summary['flags'] = {name: sum(row[name] for row in rows) for name in FLAGS}
    summary['accuracy'] = (sum(row['label'] == row['prediction'] for row in rows) / len(rows)) if rows else math.nan
    return summary


def evaluate(source, part='test', *, method='lrp', epsilon=0.25, gamma=0.1, quantile=0.9, target='label',
             batch_size=8, device='cpu', out=None, composite_kwargs=None, progress=True, figures=0, criteria='both',
             perturbation=None, contrast=None):
    """Explain every image of a split, score each map against its tumour mask and by region perturbation, and
    summarise.

    Parameters
    ----------
    source: Source
        Model and data (see :func:`lrp_brain.sources.open_source`).
    part: str
        The split part: ``'test'`` (default), ``'val'`` or ``'train'``.
    method: str
        ``'lrp'``, ``'gradient'``, ``'gradxinput'`` or ``'zennit-egb'`` (see :func:`lrp_brain.explain.explain`).
    epsilon, gamma: float
        The LRP parameters (``method='lrp'``).
    quantile: float
        The relevance mask keeps the pixels above this quantile (0.9: the top 10 %).
    target: str or int
        ``'label'`` (the true class, as in the study), ``'pred'`` or a class index.
    batch_size: int
    device: str or torch.device
    out: str, optional
        Folder for ``rows.csv``, ``summary.json`` (and the row log a killed run resumes from); nothing is written if
        ``None``.
    composite_kwargs: dict, optional
        More :class:`~lrp_brain.composites.VGGComposite` options.
    progress: bool
        Show a progress bar over images.
    figures: int
        With ``out``, draw the four-panel figure of the ``figures`` best and worst images by IoU.
    criteria: str or sequence of str
        ``'localisation'`` (the metrics of :func:`lrp_brain.metrics.evaluate_maps`), ``'faithfulness'`` (the
        :data:`lrp_brain.faithfulness.COLUMNS`: MoRF AUC, LeRF AUC, their gap) or ``'both'`` (default).
    perturbation: dict, optional
        Region-perturbation settings replacing some of :data:`lrp_brain.faithfulness.DEFAULTS` (``patch_size``,
        ``steps``, ``baseline``, ``score``, ...).
    contrast: str, optional
        The output relevance of every map (:mod:`lrp_brain.contrast`): ``None`` (one-hot), ``'sglrp'`` or ``'clrp'``;
        see :func:`lrp_brain.explain.explain` for the methods that take each.

    Returns
    -------
    rows: list of dict
        One per image, in split order.
    summary: dict
        See :func:`summarize_rows`, plus ``'settings'``, ``'model'``, ``'data'`` and ``'versions'``.

    Raises
    ------
    ValueError
        Before anything is written: bad ε, γ or bounds (the composite's check, for every method), a quantile outside
        [0, 1) (:func:`lrp_brain.metrics.check_selection_quantile`), a contrast the method does not take or a model
        with one class (:func:`lrp_brain.contrast.check_contrast`), an empty split part (:class:`DataError`, with
        the size of every part).
    OutputError
        Where ``out`` cannot be written (checked before any work), or another run is using it.
    """
    dataset = source.dataset(part)
    low, high = source.bounds
    # before any output, so a rerun is not blocked
    contrast = check_options(method, epsilon, gamma, low, high, composite_kwargs, contrast, len(source.class_names))
    quantile = metrics.check_selection_quantile(quantile)
    criteria = check_criteria(criteria, source.has_masks)
    perturbation = faithfulness.settings(perturbation) if 'faithfulness' in criteria else None
    if not len(dataset):
        sizes = ', '.join(f'{name} {len(refs)}' for name, refs in source.split.parts().items())
        raise DataError(f'the {part} part of the split is empty ({sizes} images): nothing to evaluate; choose '
                        f'another part or a split with {part} images', source.data, 'empty split')
    settings = {
        'method': method, 'epsilon': epsilon, 'gamma': gamma, 'quantile': quantile, 'target': target,
        'split': part, **source.bounds_record(), 'input_size': source.transform.size,
        'composite_kwargs': composite_kwargs or {}, 'criteria': list(criteria), 'perturbation': perturbation,
        'contrast': contrast,
    }
    identity = {'settings': settings, 'batch_size': int(batch_size), 'model': source.model_id,
                'data': source.data_id(part)}
    keys = [relative_ref(ref, source.split.root) for ref in dataset.refs]
    model = source.model.to(device).eval()

    def compute(indices):
        batch = stack_batch(dataset, indices)
        explanation = explain(
            source.model, batch['image'], target=target, labels=batch['label'], method=method, epsilon=epsilon,
            gamma=gamma, low=low, high=high, batch_size=batch_size, device=device, composite_kwargs=composite_kwargs,
            contrast=contrast,
        )
        faithful = None if perturbation is None else faithfulness.columns(
            model, batch['image'], explanation.relevance, explanation.targets, perturbation, batch['path'])
        return score_rows(batch, explanation, quantile if 'localisation' in criteria else None, source.class_names,
                          source.split.root, faithful)

    # the output folder is checked writable and held for this run (rank 0 writes): a second run on it is refused
    with nullcontext() if out is None else distributed.held_by_main(
            lambda: exclusive(os.path.join(out, '.lock'), f'the output folder {out}')):
        rows = distributed.batch_rows(keys, batch_size, compute, identity=identity, progress=progress,
                                      log_path=None if out is None else os.path.join(out, 'rows.jsonl'),
                                      description=f'evaluate {part}')
        summary = {
            **summarize_rows(rows, source.class_names), 'settings': settings, 'model': source.model_id,
            'data': {'source': source.data, 'split_method': source.split.method, 'split_seed': source.split.seed,
                     'part': part, 'fingerprint': identity['data']},
            'versions': library_versions(), 'processes': distributed.world_size(),
        }
        if out is not None:
            distributed.on_main(lambda: _write_outputs(
                source, dataset, rows, summary, out, figures, method=method, epsilon=epsilon, gamma=gamma,
                quantile=quantile, target=target, device=device, composite_kwargs=composite_kwargs, contrast=contrast,
            ))
    return rows, summary


def _write_outputs(source, dataset, rows, summary, out, figures, **options):
    atomic_write_csv(os.path.join(out, 'rows.csv'), rows)
    atomic_write_json(os.path.join(out, 'summary.json'), summary)
    if figures and 'iou' in summary:
        draw_figures(source, dataset, rows, out, figures, **options)


def draw_figures(source, dataset, rows, out, count, *, method, epsilon, gamma, quantile, target, device,
                 composite_kwargs=None, contrast=None):
    """Draw the four-panel figure (image, mask, relevance, relevance mask with IoU) of the best and worst images."""
    from lrp_brain.figures import four_panel, select_images

    low, high = source.bounds
    iou = torch.tensor([row['iou'] for row in rows], dtype=torch.float64)
    paths = []
    for mode in ('best', 'worst'):
        for rank, index in enumerate(select_images(iou, k=count, mode=mode)):
            item = dataset[int(index)]
            explanation = explain(
                source.model, item['image'][None], target=target, labels=torch.tensor([item['label']]),
                method=method, epsilon=epsilon, gamma=gamma, low=low, high=high, device=device,
                composite_kwargs=composite_kwargs, contrast=contrast,
            )
            relevance = explanation.relevance[0]
            row = rows[int(index)]
            paths.append(four_panel(
                os.path.join(out, 'figures', f'{mode}{rank + 1}.png'), item['image'][0], item['mask'], relevance,
                metrics.relevance_mask(relevance[None], quantile)[0], row['iou'],
                title=f'{row["file"]}: {row["label"]}, predicted {row["prediction"]}',
            ))
    return paths
