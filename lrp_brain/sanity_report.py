"""The loop behind ``lrp-brain sanity``: the sanity checks of :mod:`lrp_brain.sanity` on the first images of a
dataset split, written as ``sanity.json`` and drawn as ``sanity.png``.

For the LRP setting asked for and for the gradient (the reference of Adebayo et al.) it runs the cascading
model-parameter randomisation test and measures the class sensitivity of the maps; the JSON holds the mean similarity
per randomisation stage and measure, the per-image values and the settings, the figure the similarity against the
randomised depth, one line per method.
"""
import os

from lrp_brain.contrast import check_contrast
from lrp_brain.evaluate import stack_batch
from lrp_brain.outputs import atomic_write_json
from lrp_brain.sanity import CONTRASTED, MEASURES, SanityError, class_sensitivity, randomisation_test
from lrp_brain.versions import library_versions

#: The methods compared by default: LRP and its reference, the gradient.
DEFAULT_METHODS = ('lrp', 'gradient')


def _first_images(source, part, count):
    """The first ``count`` images of split part ``part`` (in the split's order) with their labels."""
    dataset = source.dataset(part)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise SanityError(f'count must be an integer >= 1, got {count!r}')
    if len(dataset) == 0:
        raise SanityError(f'the {part} split of {source.data} holds no images')
    batch = stack_batch(dataset, range(min(count, len(dataset))))
    return batch['image'], batch['label'], batch['path']


def run_sanity(source, part='test', count=16, *, methods=DEFAULT_METHODS, epsilon=0.25, gamma=0.1, seed=0,
               batch_size=8, device='cpu', composite_kwargs=None, out=None, contrast=None):
    """Run the randomisation test and the class sensitivity on the first ``count`` images of a split.

    Parameters
    ----------
    source: lrp_brain.sources.Source
        Model and data (see :func:`lrp_brain.sources.open_source`).
    part: str
        The split part, ``'test'`` by default.
    count: int
        How many images (the first of the part, in its order).
    methods: sequence of str
        Attribution methods of :func:`lrp_brain.explain.explain`; LRP and the gradient by default.
    epsilon, gamma, composite_kwargs:
        The LRP setting.
    seed: int
        Seeds the re-initialised weights.
    batch_size: int
    device: str or torch.device
    out: str, optional
        Folder for ``sanity.json`` and ``sanity.png``; nothing is written if ``None``.
    contrast: str, optional
        The output relevance (:mod:`lrp_brain.contrast`) of the LRP methods' maps (:data:`lrp_brain.sanity.CONTRASTED`),
        in both checks; the gradient stays the plain reference.

    Returns
    -------
    dict
        What ``sanity.json`` holds: ``randomisation`` (:meth:`~lrp_brain.sanity.RandomisationResult.to_dict`),
        ``class_sensitivity`` (per method, :meth:`~lrp_brain.sanity.ClassSensitivity.to_dict`), ``images`` (the
        files), ``settings``, ``model``, ``versions``.
    """
    contrast = check_contrast(contrast, classes=len(source.class_names))
    images, labels, paths = _first_images(source, part, count)
    low, high = source.bounds
    options = dict(epsilon=epsilon, gamma=gamma, low=low, high=high, batch_size=batch_size, device=device,
                   composite_kwargs=composite_kwargs)
    randomisation = randomisation_test(source.model, images, 'label', labels, methods=methods, seed=seed,
                                       contrast=contrast, **options)
    sensitivity = {method: class_sensitivity(source.model, images, method=method,
                                             contrast=contrast if method in CONTRASTED else None, **options).to_dict()
                   for method in randomisation.methods}
    report = {
        'randomisation': randomisation.to_dict(),
        'class_sensitivity': sensitivity,
        'images': paths,
        'settings': {'part': part, 'count': len(paths), 'methods': list(randomisation.methods),
                     'epsilon': float(epsilon), 'gamma': float(gamma), 'seed': int(seed), **source.bounds_record(),
                     'composite_kwargs': composite_kwargs or {}, 'contrast': contrast},
        'model': source.model_id,
        'versions': library_versions(),
    }
    if out is not None:
        from lrp_brain.figures import randomisation_figure

        atomic_write_json(os.path.join(out, 'sanity.json'), report)
        randomisation_figure(
            os.path.join(out, 'sanity.png'), randomisation.stages, randomisation.summary(),
            {method: values['mean_over_images']['spearman'] for method, values in sensitivity.items()},
            title=f'model-parameter randomisation, {len(paths)} {part} images (LRP ε = {epsilon:g}, γ = {gamma:g}'
                  + (f', {contrast.upper()})' if contrast else ')'),
        )
    return report


def format_sanity(report):
    """A few lines for the terminal: the similarity to the original maps once the whole model is random, and the
    class sensitivity, per method."""
    lines = []
    stages = report['randomisation']['stages']
    for method, measures in report['randomisation']['mean'].items():
        last = ', '.join(f'{measure} {_number(measures[measure][-1])}' for measure in MEASURES)
        classes = report['class_sensitivity'][method]['mean_over_images']['spearman']
        contrast = report['class_sensitivity'][method]['settings']['contrast']
        named = f'{method} ({contrast.upper()})' if contrast else method
        lines.append(f'{named}: after randomising {stages[-1]} (all {len(stages) - 1} groups) {last}; '
                     f'class sensitivity (mean Spearman between classes) {_number(classes)}')
    return '\n'.join(lines)


def _number(value):
    return 'n/a' if value is None else f'{value:.3f}'
