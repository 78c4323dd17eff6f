"""The output relevance a relevance map starts from: one-hot, or class-contrastive (SGLRP, CLRP).

With the forward pass fixed, every rule of an LRP composite (and the gradient) is linear in the relevance fed at the
output, so a contrastive map is one relevance pass from another output vector ``r`` (``(N, K)`` for ``N`` images and
``K`` classes, target class ``t`` of each image, ``δ`` the Kronecker delta, ``p = softmax(logits)``):

==========  ==========================================================================================================
contrast    output relevance ``r_n`` and what is done with the input relevance ``R``
==========  ==========================================================================================================
``None``    ``δ_tn`` (one-hot, Zennit's convention); ``R`` as it comes
``'sglrp'`` softmax-gradient LRP (Iwana, Kuroki, Uchida 2019): ``p_t (δ_tn − p_n)``, the gradient of ``p_t`` with
            respect to the logits, divided by the positive factor ``p_t (1 − p_t)`` (see *Saturation*):
            ``δ_tn − q_n`` with ``q_n = exp(f_n) / Σ_{m≠t} exp(f_m)`` for ``n ≠ t`` and ``q_t = 0``, the
            softmax of the other classes' logits; ``R`` as it comes
``'clrp'``  contrastive LRP (Gu, Yang, Tresp 2018, the first variant): ``δ_tn − d_n`` with the dual class
            ``d_n = (1 − δ_tn) / (K − 1)`` spread evenly over the other classes; then ``R ← max(0, R)``, the
            positive part (the relevance of the target minus that of the dual: one pass, by linearity)
==========  ==========================================================================================================

Both contrastive vectors sum to 0 over the classes: what the classes share cancels, and what tells the target from
the others is left. Both need ``K ≥ 2`` (with one class there is nothing to contrast: refused).

**Saturation.** A confident model (the demo model predicts with p = 1.000) has ``1 − p_t`` below float32's
resolution, so ``p_t (δ_tn − p_n)`` computed in float32 is 0 and the map vanishes. Here ``p`` comes from the logits
in float64 through ``log_softmax``, and by default (``normalise=True``, what :func:`lrp_brain.explain.explain`, the
sweep engine and the commands use) the vector is divided by ``p_t (1 − p_t)``: ``δ_tn − q_n`` above is computed from
the logits directly, never from ``1 − p_t``, so it is exact for any finite logits, however large the logit gap (in
float64 ``p_t (1 − p_t)`` itself underflows to 0 for gaps beyond ~745). The division scales each image's map by a
positive number, which changes no metric of this project (quantile masks, pointing game, mass, ranks, region
perturbation, Spearman, SSIM of max-scaled maps). ``normalise=False`` keeps the paper's scale ``p_t (δ_tn − p_n)``
and refuses (:class:`ContrastError`, naming the image, its factor and the fix) an image whose factor
``p_t (1 − p_t)`` is below :func:`smallest_factor` of the output's dtype, where the map would lose its precision on
the way down or vanish: never a silent zero map.

Plain Zennit users pass :func:`attr_output` as an attributor's ``attr_output`` (and, for CLRP, take
:func:`input_relevance` of the result)::

    with Gradient(model, EpsilonGammaBox(low=0., high=1.)) as attributor:
        output, relevance = attributor(images, attr_output(targets, 'sglrp'))
"""
import math

import torch

#: The contrasts: ``None`` (one-hot), SGLRP and CLRP.
CONTRASTS = (None, 'sglrp', 'clrp')

#: The names of the contrasts on the command line (``'none'`` is ``None``).
CONTRAST_NAMES = ('none', 'sglrp', 'clrp')

#: The contrasts each attribution method of :func:`lrp_brain.explain.explain` accepts. The gradient takes SGLRP (it
#: is then the gradient of the softmax probability ``∂p_t/∂x``, divided by ``p_t (1 − p_t)``), not CLRP: the sign of a
#: gradient says which way the score moves, not evidence for a class, so its positive part is no relevance.
ACCEPTED = {
    'lrp': CONTRASTS,
    'zennit-egb': CONTRASTS,
    'gradxinput': CONTRASTS,
    'gradient': (None, 'sglrp'),
}


class ContrastError(ValueError):
    """A contrast that cannot be computed: an unknown name, a method it does not apply to, a model with one class, or
    an unnormalised SGLRP vector too small for the dtype."""


def check_contrast(contrast, method=None, classes=None):
    """Return ``contrast`` as one of :data:`CONTRASTS` (``'none'`` is ``None``), checked against the method and the
    number of classes when given.

    Raises
    ------
    ContrastError
        For an unknown contrast, one ``method`` does not accept (:data:`ACCEPTED`), or a contrast with ``classes < 2``.
    """
    if isinstance(contrast, str) and contrast.lower() == 'none':
        contrast = None
    if contrast not in CONTRASTS:
        raise ContrastError(f'contrast must be one of {", ".join(CONTRAST_NAMES)}, got {contrast!r}')
    if method is not None and method in ACCEPTED and contrast not in ACCEPTED[method]:
        raise ContrastError(f'method {method!r} does not take contrast {contrast!r}: the positive part of a gradient '
                            f'is no relevance; use sglrp, or gradxinput with clrp')
    if contrast is not None and classes is not None and classes < 2:
        raise ContrastError(f'contrast {contrast!r} needs a model with two classes or more, but it has {classes}: '
                            f'with one class there is nothing to contrast')
    return contrast


def _targets(logits, targets):
    """The checked ``(N,)`` long targets on the device of the ``(N, K)`` ``logits`` (an int for every image)."""
    if logits.ndim != 2:
        raise ContrastError(f'the output must be (N, K) logits, got shape {tuple(logits.shape)}')
    count, classes = logits.shape
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.dtype in (torch.bool,) or targets.is_floating_point() or targets.is_complex():
        raise ContrastError(f'targets must be class indices, got dtype {targets.dtype}')
    targets = targets.long().expand(count) if targets.ndim == 0 else targets.long()
    if targets.shape != (count,):
        raise ContrastError(f'targets must be one class index per image ({count}), got shape {tuple(targets.shape)}')
    if count and (targets.min() < 0 or targets.max() >= classes):
        raise ContrastError(f'targets must lie in 0 .. {classes - 1}, got {targets.tolist()}')
    return targets


def one_hot(logits, targets):
    """``δ_tn``: 1 at each image's target class, 0 elsewhere, ``(N, K)`` in the dtype of ``logits``."""
    targets = _targets(logits, targets)
    return torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits)


def _need_contrast(logits, name):
    if logits.shape[1] < 2:
        raise ContrastError(f'{name} needs a model with two classes or more, but its output has '
                            f'{logits.shape[1]}: with one class there is nothing to contrast')


def smallest_factor(dtype):
    """The smallest ``p_t (1 − p_t)`` unnormalised SGLRP accepts in ``dtype``: the square root of the smallest normal
    number (``1.1e-19`` for float32, ``1.5e-154`` for float64), leaving the relevance as many orders of magnitude for
    its own range through the network as the factor took."""
    return math.sqrt(torch.finfo(dtype).tiny)


def softmax_gradient(logits, targets, normalise=True):
    """SGLRP's output relevance: ``p_t (δ_tn − p_n)``, or with ``normalise`` that divided by ``p_t (1 − p_t)``,
    ``δ_tn − q_n`` (see the module docstring), computed in float64 from the logits; ``(N, K)`` in their dtype.

    Raises
    ------
    ContrastError
        For a model with one class; without ``normalise``, for an image whose ``p_t (1 − p_t)`` is below
        :func:`smallest_factor` of the logits' dtype (a saturated prediction), naming it.
    """
    targets = _targets(logits, targets)
    _need_contrast(logits, 'SGLRP')
    exact = logits.detach().double()
    target_mask = torch.nn.functional.one_hot(targets, exact.shape[1]).bool()
    # q: the softmax of the other classes' logits, 0 at the target; never formed as p_n / (1 − p_t)
    others = exact.masked_fill(target_mask, -math.inf).log_softmax(dim=1).exp()
    normalised = target_mask.double() - others
    if normalise:
        return normalised.to(logits)
    log_p = exact.log_softmax(dim=1)
    log_target = log_p.gather(1, targets[:, None])
    # 1 − p_t = Σ_{n≠t} p_n, summed in log space
    log_rest = log_p.masked_fill(target_mask, -math.inf).logsumexp(dim=1, keepdim=True)
    factor = (log_target + log_rest).exp()
    small = (factor.flatten() < smallest_factor(logits.dtype)).nonzero().flatten().tolist()
    if small:
        image = small[0]
        raise ContrastError(
            f'SGLRP of image {image} (of {small}) is saturated: p_t (1 − p_t) = {factor[image].item():.3g} for '
            f'target {targets[image].item()}, below {smallest_factor(logits.dtype):.3g}, where the map in '
            f'{logits.dtype} loses its precision or vanishes; normalise=True gives the same map divided by that factor')
    return (factor * normalised).to(logits)


def contrastive(logits, targets):
    """CLRP's output relevance ``δ_tn − (1 − δ_tn) / (K − 1)``: the target minus the dual class spread evenly over the
    others, ``(N, K)`` in the dtype of ``logits``. Take :func:`input_relevance` of the map it gives."""
    targets = _targets(logits, targets)
    _need_contrast(logits, 'CLRP')
    target_mask = torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits)
    return target_mask - (1 - target_mask) / (logits.shape[1] - 1)


def output_relevance(logits, targets, contrast=None):
    """The output relevance of ``contrast`` (one of :data:`CONTRASTS`) for the ``(N, K)`` ``logits`` and the targets
    (one class index, or one per image), ``(N, K)`` in the dtype of ``logits``; SGLRP normalised."""
    contrast = check_contrast(contrast)
    if contrast == 'sglrp':
        return softmax_gradient(logits, targets)
    if contrast == 'clrp':
        return contrastive(logits, targets)
    return one_hot(logits, targets)


def attr_output(targets, contrast=None):
    """A Zennit ``attr_output``: the function of the model's output that gives :func:`output_relevance`."""
    contrast = check_contrast(contrast)

    def relevance_at_output(output):
        return output_relevance(output, targets, contrast)

    return relevance_at_output


def input_relevance(relevance, contrast=None):
    """What the contrast does with the relevance the pass gives: CLRP's positive part ``max(0, R)``; unchanged
    otherwise."""
    return relevance.clamp(min=0) if check_contrast(contrast) == 'clrp' else relevance
