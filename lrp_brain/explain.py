"""Relevance maps of a classifier for a batch of images: LRP with :class:`~lrp_brain.composites.VGGComposite`, and
the baselines it is compared with.

Every method is one vector-Jacobian product through the model, computed by :class:`zennit.attribution.Gradient`:

============  ===============================================================================================
method        relevance of the input ``x`` for the target class ``t``
============  ===============================================================================================
lrp           LRP with ``VGGComposite(epsilon, gamma, low, high)``, output relevance ``one_hot(t)``
gradient      ``∂f_t/∂x``
gradxinput    ``x · ∂f_t/∂x``
zennit-egb    LRP with Zennit's stock ``EpsilonGammaBox(low, high)`` (z^B first, γ = 0.25 for the other
              convolutions, ε = 1e-6 for the linear layers) and Zennit's VGG canonizer (BatchNorm merging)
============  ===============================================================================================

The output relevance follows Zennit's convention: the vector fed at the output is one-hot, 1 at the target class
and 0 elsewhere (not the target logit). For a conservative rule the input relevance therefore sums to roughly 1 per
image, not to the logit; multiply by the target logit to get the logit-conserving convention. ``contrast='sglrp'`` or
``'clrp'`` starts from a class-contrastive vector instead (:mod:`lrp_brain.contrast`; which method takes which:
:data:`lrp_brain.contrast.ACCEPTED`).
"""
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral

import torch
from tqdm import tqdm
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox
from zennit.torchvision import VGGCanonizer

from lrp_brain.composites import VGGComposite
from lrp_brain.contrast import check_contrast, input_relevance, output_relevance

#: The names of the attribution methods :func:`explain` knows.
METHODS = ('lrp', 'gradient', 'gradxinput', 'zennit-egb')

#: The names ``target`` may take besides class indices.
TARGET_NAMES = ('label', 'pred')


class ExplainError(ValueError):
    """An argument of :func:`explain` (images, targets, method, model) that cannot be explained."""


@dataclass
class Explanation:
    """Relevance maps and the model's outputs for a batch of images, all on the CPU.

    Attributes
    ----------
    relevance: torch.Tensor
        ``(N, C, H, W)``, the relevance (or gradient) of every input value for the image's target class.
    logits: torch.Tensor
        ``(N, K)``, the model's outputs.
    probabilities: torch.Tensor
        ``(N, K)``, the softmax of ``logits``.
    predictions: torch.Tensor
        ``(N,)``, the predicted class (argmax of ``logits``).
    targets: torch.Tensor
        ``(N,)``, the class each map explains.
    """
    relevance: torch.Tensor
    logits: torch.Tensor
    probabilities: torch.Tensor
    predictions: torch.Tensor
    targets: torch.Tensor


def _class_indices(values, name, count):
    """Return ``values`` (int, sequence or tensor of class indices) as a long tensor, checking dtype and length."""
    if isinstance(values, bool):
        raise ExplainError(f'{name} must be class indices, got the bool {values!r}')
    if isinstance(values, Integral):
        return torch.tensor(int(values))
    try:
        indices = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ExplainError(f'{name} must be class indices (int, sequence or tensor of int), got {values!r}') \
            from error
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise ExplainError(f'{name} must hold integer class indices, got dtype {indices.dtype}')
    if indices.ndim > 1 or (indices.ndim == 1 and len(indices) != count):
        raise ExplainError(f'{name} must be one class index per image ({count} images), got shape '
                           f'{tuple(indices.shape)}')
    return indices.long()


def _target_spec(target, labels, count):
    """Check ``target`` and ``labels`` for ``count`` images.

    Returns
    -------
    torch.Tensor or None
        The class index of every image (``(count,)`` or a scalar for all), or ``None`` for ``target='pred'``.
    """
    if isinstance(target, str):
        if target not in TARGET_NAMES:
            raise ExplainError(f'target must be one of {TARGET_NAMES}, a class index or one index per image, got '
                               f'{target!r}')
        if target == 'pred':
            return None
        if labels is None:
            raise ExplainError("target='label' needs the images' labels; pass labels=... or use target='pred' or a "
                               "class index")
        return _class_indices(labels, 'labels', count)
    return _class_indices(target, 'target', count)


def _checked_targets(spec, logits, source, offset=0):
    """Return the targets of the images of ``logits`` (``spec``: their class indices, or ``None`` for the argmax).

    ``source`` names where the indices came from and ``offset`` is the first image's index, for the error message.
    """
    count, classes = logits.shape
    indices = logits.detach().argmax(dim=1) if spec is None else spec.to(logits.device).expand(count).clone()
    outside = ((indices < 0) | (indices >= classes)).nonzero().flatten()
    if len(outside):
        position = outside[0].item()
        raise ExplainError(f'{source} of image {offset + position} is class {indices[position].item()}, but the model '
                           f'has {classes} classes (0 .. {classes - 1})')
    return indices


def _target_source(target):
    return 'labels' if isinstance(target, str) else 'target'


def resolve_targets(target, logits, labels=None):
    """Return the class each image's relevance map explains.

    Parameters
    ----------
    target: str, int, sequence of int or torch.Tensor
        ``'label'`` (the true class, given by ``labels``; the study's choice), ``'pred'`` (the predicted class), a
        class index for every image, or one class index per image.
    logits: torch.Tensor
        ``(N, K)``, the model's outputs for the ``N`` images; ``K`` is the number of classes.
    labels: int, sequence of int or torch.Tensor, optional
        ``(N,)``, the true classes; needed for ``target='label'``.

    Returns
    -------
    torch.LongTensor
        ``(N,)``, the target class of every image, on the device of ``logits``.

    Raises
    ------
    ExplainError
        If ``target`` is not one of these, ``'label'`` comes without ``labels``, the number of indices is not ``N``,
        or a class index is not in ``0 .. K-1``.
    """
    if logits.ndim != 2:
        raise ExplainError(f'logits must be (N, K), got shape {tuple(logits.shape)}')
    spec = _target_spec(target, labels, len(logits))
    return _checked_targets(spec, logits, _target_source(target))


def _image_list(indices):
    """Image indices for a message: ``'3'``, or ``'3 (images with them: [3, 5])'``, at most ten listed."""
    if len(indices) == 1:
        return str(indices[0])
    return f'{indices[0]} (images with them: {indices[:10]}{" ..." if len(indices) > 10 else ""})'


def _non_finite_images(batch, offset=0):
    """The indices (plus ``offset``) of the images of ``batch`` (N, ...) that hold NaN or inf."""
    finite = torch.isfinite(batch.detach()).flatten(start_dim=1).all(dim=1)
    return [index + offset for index in (~finite).nonzero().flatten().tolist()]


def _check_images(images):
    if not isinstance(images, torch.Tensor):
        raise ExplainError(f'images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}')
    if images.ndim != 4:
        raise ExplainError(f'images must be (N, C, H, W), got shape {tuple(images.shape)}')
    if not images.is_floating_point():
        raise ExplainError(f'images must be floating point, got dtype {images.dtype}')
    bad = _non_finite_images(images)
    if bad:
        raise ExplainError(f'image {_image_list(bad)} has NaN or infinite values')


def _check_finite_results(logits, relevance, offset, method, settings):
    """Raise an :class:`ExplainError` naming the images of a batch whose logits or relevance hold NaN or inf.

    ``offset`` is the batch's first image index; ``settings`` ends the message (see :func:`_settings_in_words`).
    """
    bad_logits = _non_finite_images(logits, offset)
    if bad_logits:
        raise ExplainError(f'the model output of image {_image_list(bad_logits)} is NaN or infinite: the model (its '
                           f'weights) is broken for this input')
    bad_relevance = _non_finite_images(relevance, offset)
    if bad_relevance:
        raise ExplainError(f'the {method} relevance of image {_image_list(bad_relevance)} is NaN or infinite{settings}')


def _settings_in_words(method, epsilon, gamma, composite_kwargs):
    """``' with epsilon=…, gamma=…, …'``: the parameters of an LRP ``method`` for messages, with the cause of a known
    way to get NaN; ``''`` for the gradient methods and for default settings."""
    if method not in ('lrp', 'zennit-egb'):
        return ''
    options = dict(composite_kwargs or {})
    parameters = [f'epsilon={epsilon:g}', f'gamma={gamma:g}'] if method == 'lrp' else []
    parameters += [f'{key}={value!r}' for key, value in options.items()]
    words = f' with {", ".join(parameters)}' if parameters else ''
    if options.get('std_epsilon'):
        words += ('; std_epsilon=True scales ε by the standard deviation of each layer output, which is 0 where a '
                  'layer gives the same value everywhere (e.g. an all-zero image through zero biases): use '
                  'std_epsilon=False for such images')
    return words


def _composite(method, epsilon, gamma, low, high, composite_kwargs):
    """Return the composite of ``method`` (``None`` for the gradient methods)."""
    composite_kwargs = dict(composite_kwargs or {})
    if method == 'lrp':
        return VGGComposite(epsilon, gamma, low, high, **composite_kwargs)
    if method == 'zennit-egb':
        return EpsilonGammaBox(low=low, high=high, **{'canonizers': [VGGCanonizer()], **composite_kwargs})
    if composite_kwargs:
        raise ExplainError(f'method {method!r} uses no composite, but composite_kwargs={composite_kwargs!r} were given')
    return None


def check_options(method, epsilon, gamma, low, high, composite_kwargs=None, contrast=None, classes=None):
    """Check the options of :func:`explain` before any work or output: the method, and its composite, built once
    (:class:`~lrp_brain.composites.VGGComposite`'s own check of ε, γ and the bounds), and the contrast (for a model
    of ``classes`` classes, when given). ε and γ are checked for every method, since runs record them with their
    results. Returns the contrast as one of :data:`lrp_brain.contrast.CONTRASTS` (``'none'`` is ``None``).

    Raises
    ------
    ExplainError
        For an unknown method, or composite_kwargs for a gradient method.
    ContrastError
        :func:`lrp_brain.contrast.check_contrast`'s: an unknown contrast, one the method does not take, a model with
        one class.
    ValueError
        The composite's, e.g. ``epsilon must be finite, got nan``.
    """
    if method not in METHODS:
        raise ExplainError(f'method must be one of {METHODS}, got {method!r}')
    contrast = check_contrast(contrast, method, classes)
    if method != 'lrp':
        VGGComposite(epsilon, gamma, low, high)
    _composite(method, epsilon, gamma, low, high, composite_kwargs)
    return contrast


@contextmanager
def _prepared(model, device):
    """Put ``model`` on ``device`` in eval mode with parameter gradients off, and restore all three afterwards.

    The model's own device is restored on exit (also on error); it is only moved when it is not on ``device``.
    """
    device = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    home = {tensor.device for tensor in tensors}
    if len(home) > 1:
        raise ExplainError(f'the model is spread over several devices {sorted(map(str, home))}; explain needs it on '
                           f'one')
    home = home.pop() if home else device
    training = {module: module.training for module in model.modules()}
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    moved = home != device and not (device.index is None and home.type == device.type)
    try:
        if moved:
            model.to(device)
        model.eval()
        for parameter in requires_grad:
            parameter.requires_grad_(False)
        yield next(iter(model.parameters())).device if requires_grad else device
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
        for module, flag in training.items():
            module.train(flag)
        if moved:
            model.to(home)


def explain(model, images, target='label', labels=None, method='lrp', *, epsilon=0.25, gamma=0.1, low=0., high=1.,
            batch_size=16, device='cpu', composite_kwargs=None, progress=False, contrast=None):
    """Compute relevance maps of ``model`` for ``images`` in batches.

    Parameters
    ----------
    model: torch.nn.Module
        The classifier, ``(N, C, H, W) -> (N, K)`` logits. It is used in eval mode with parameter gradients off, on
        ``device``; its mode, ``requires_grad`` flags and device are restored afterwards, and no ``.grad`` is
        accumulated. Rule hooks and canonizers are removed afterwards, also on error.
    images: torch.Tensor
        ``(N, C, H, W)`` floating point, finite, preprocessed as the model expects (min-max to [0, 1] here).
    target: str, int, sequence of int or torch.Tensor
        The class to explain: ``'label'`` (the true class, default, as in the study), ``'pred'`` (the predicted
        class), one class index for all images, or one per image; see :func:`resolve_targets`.
    labels: sequence of int or torch.Tensor, optional
        ``(N,)``, the true classes; needed for ``target='label'``.
    method: str
        One of :data:`METHODS` (see the module docstring).
    epsilon, gamma: float
        ε and γ of :class:`~lrp_brain.composites.VGGComposite`; used by ``'lrp'`` only.
    low, high: float or torch.Tensor
        The z^B bounds, the smallest and largest input value (from
        :func:`~lrp_brain.composites.zbox_bounds` of the transform); used by ``'lrp'`` and ``'zennit-egb'``.
    batch_size: int
        Images per forward/backward pass.
    device: str or torch.device
        Where to compute; the results come back on the CPU.
    composite_kwargs: dict, optional
        More keyword arguments of the composite: of ``VGGComposite`` for ``'lrp'`` (e.g. ``std_epsilon=True``), of
        ``EpsilonGammaBox`` for ``'zennit-egb'`` (e.g. ``gamma=0.1``, ``canonizers=[]``); not allowed for the gradient
        methods.
    progress: bool
        Show a tqdm progress bar over the images.
    contrast: str, optional
        The output relevance (:mod:`lrp_brain.contrast`): ``None`` (one-hot), ``'sglrp'`` (the softmax gradient,
        normalised by ``p_t (1 − p_t)``: exact for saturated predictions) or ``'clrp'`` (the target minus the dual
        class, then the positive part of the input relevance). ``'lrp'``, ``'zennit-egb'`` and ``'gradxinput'``
        take both, ``'gradient'`` SGLRP only (``∂p_t/∂x``, normalised).

    Returns
    -------
    Explanation
        The relevance ``(N, C, H, W)``, logits, probabilities, predictions and targets, on the CPU.

    Raises
    ------
    ExplainError
        For an unknown method, bad images (not 4-D floating point, or an image with NaN/inf, named by index), bad
        targets or labels (see :func:`resolve_targets`), a batch size below 1, or composite_kwargs for a gradient
        method; and for results with NaN or inf, naming the images: logits (a broken model) or relevance (e.g.
        ``std_epsilon=True`` on a layer whose output is constant). No NaN leaves this function. The composite's own
        ValueError for bad ε, γ or bounds.
    ContrastError
        For an unknown contrast, one the method does not take, or a contrast on a model with one class.
    """
    if method not in METHODS:
        raise ExplainError(f'method must be one of {METHODS}, got {method!r}')
    contrast = check_contrast(contrast, method)
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ExplainError(f'batch_size must be an integer >= 1, got {batch_size!r}')
    _check_images(images)
    count = len(images)
    spec = _target_spec(target, labels, count)
    source = _target_source(target)
    composite = _composite(method, epsilon, gamma, low, high, composite_kwargs)
    settings = _settings_in_words(method, epsilon, gamma, composite_kwargs)
    results = {'relevance': [], 'logits': [], 'targets': []}

    with _prepared(model, device) as model_device, Gradient(model, composite) as attributor:
        with tqdm(total=count, unit='image', desc=f'explain ({method})', disable=not progress) as bar:
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                batch = images[start:stop].detach().to(model_device).requires_grad_(True)
                batch_spec = spec if spec is None or spec.ndim == 0 else spec[start:stop]
                batch_targets = []

                def relevance_at_output(logits):
                    # one-hot at the target (Zennit's convention), or the contrast's vector
                    batch_targets.append(_checked_targets(batch_spec, logits, source, offset=start))
                    return output_relevance(logits, batch_targets[0], contrast)

                logits, gradient = attributor(batch, relevance_at_output)
                relevance = input_relevance(gradient * batch if method == 'gradxinput' else gradient, contrast)
                _check_finite_results(logits, relevance, start, method, settings)
                results['relevance'].append(relevance.detach().cpu())
                results['logits'].append(logits.detach().cpu())
                results['targets'].append(batch_targets[0].cpu())
                bar.update(stop - start)

    logits = torch.cat(results['logits'])
    return Explanation(
        relevance=torch.cat(results['relevance']),
        logits=logits,
        probabilities=logits.softmax(dim=1),
        predictions=logits.argmax(dim=1),
        targets=torch.cat(results['targets']),
    )


def explain_all_classes(model, image, **kwargs):
    """Compute one relevance map per class for one image (the study's per-class figure, ``--target all``).

    Parameters
    ----------
    model: torch.nn.Module
        The classifier (see :func:`explain`).
    image: torch.Tensor
        ``(C, H, W)`` or ``(1, C, H, W)``.
    **kwargs
        Keyword arguments of :func:`explain` other than ``target`` and ``labels`` (method, epsilon, gamma, low, high,
        batch_size, device, composite_kwargs, progress, contrast).

    Returns
    -------
    Explanation
        ``K`` rows, row ``k`` explaining class ``k`` (``targets == arange(K)``); logits, probabilities and
        predictions are the image's, repeated.
    """
    for name in ('target', 'labels'):
        if name in kwargs:
            raise ExplainError(f'explain_all_classes explains every class; {name}= cannot be given')
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or (image.ndim == 4 and len(image) != 1):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ExplainError(f'image must be one image (C, H, W) or (1, C, H, W), got {shape}')
    image = image.reshape(1, *image.shape[-3:])
    _check_images(image)
    with _prepared(model, kwargs.get('device', 'cpu')) as model_device, torch.no_grad():
        classes = model(image.to(model_device)).shape[1]
    return explain(model, image.repeat(classes, 1, 1, 1), target=torch.arange(classes), **kwargs)
