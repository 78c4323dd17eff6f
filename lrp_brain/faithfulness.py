"""Faithfulness of relevance maps by region perturbation (pixel flipping): replace the most (or least) relevant
patches of an image step by step and follow the classifier's score for the explained class.

A map is faithful when the patches it ranks highest are the ones the model's decision rests on: replacing them first
(MoRF, *most relevant first*) makes the score fall fast, replacing the least relevant first (LeRF) keeps it up. The
procedure for one image ``x`` with ``C`` channels, ``H × W`` pixels, relevance ``R`` and target class ``t``:

1. **Patches.** ``R`` is summed over its channels, ``r = Σ_c R_c`` (``(H, W)``), and ``r`` is summed over every
   non-overlapping ``p × p`` patch of a grid anchored at the top left corner (``p = patch_size``). A side that is not a
   multiple of ``p`` is padded with zeros at the bottom / right up to the next multiple: the last row (column) of
   patches is partial, its relevance is the sum over its real pixels only, and replacing it replaces those pixels only.
   The image is never padded. The grid has ``P = ⌈H/p⌉·⌈W/p⌉`` patches.
2. **Order.** ``'morf'``: by patch sum, largest first; ``'lerf'``: smallest first; ``'random'``: a uniformly random
   permutation per image, drawn from a CPU ``torch.Generator`` seeded with ``2·seed`` (the same on every device, and
   for every map of the image). Ties (equal patch sums in float64, e.g. a constant or all-zero map) are broken by
   the patch's row-major position, the upper left one first, in both orders; so a map without any information (all
   equal patch sums, e.g. all zero) gives identical MoRF and LeRF curves, and a gap of exactly 0.
3. **Schedule.** After step ``k = 1 … steps`` the first ``n_k`` patches of the order are replaced:
   ``n_k = k · regions_per_step`` (``'constant'``, Quantus' RegionPerturbation) or ``n_k = k²`` (``'squares'``,
   1, 3, 5, … more per step, as lrp-pf-auc). ``n_steps`` may not exceed ``P``.
4. **Baseline** (what a replaced pixel becomes; the unreplaced ones keep their value):

   - a number ``b``: every channel of the pixel is set to ``b``;
   - ``'mean'``: the image's mean of that channel;
   - ``'uniform'``: one noise image per image, uniform in ``[min x, max x]`` (over all its channels), drawn once from
     a CPU generator seeded with ``2·seed + 1`` (a stream apart from the random order's) and shared by every step,
     so that a replaced pixel keeps its value;
   - ``'blur'``: a Gaussian-blurred copy of the image, ``σ = patch_size / 2`` pixels, per channel, the kernel cut at
     ``⌊4σ + 0.5⌋`` pixels and normalised, the image extended by its edge values (``scipy.ndimage.gaussian_filter``
     with ``mode='nearest'``, ``truncate=4``);
   - ``'inpaint'``: the replaced region filled from the pixels that are not replaced at this step, by diffusion
     (:func:`inpaint`, with :data:`INPAINT_RELAXATION_PER_PATCH` · ``patch_size`` relaxation sweeps). The reason: a
     constant fill draws the patch's outline into the image, a sharp-edged square the model may respond to as a new
     feature (an out-of-distribution input, Blücher et al., TMLR 2024), so that the score drop measures the artefact
     more than the removal of information. A diffusion fill continues the surroundings' values into the hole, is
     continuous at its border, and so leaks neither the patch's shape nor a foreign intensity. It removes the
     patch's texture, not its mean level: what a smooth continuation of the surroundings can predict stays.
5. **Score.** ``s_k`` is the target logit (``'logit'``, lrp-pf-auc's choice) or its softmax probability
   (``'probability'``, Quantus' default) after step ``k``; ``s_0`` is the unperturbed image's.
6. **AUC.** The curve ``s_0, …, s_steps`` is integrated by the trapezoid rule over the step axis ``k / steps ∈
   [0, 1]`` and divided by the unperturbed score's magnitude, so that images of different confidence compare:

   ``AUC = (1 / steps) · Σ_{k=1}^{steps} (s_{k-1} + s_k) / (2 |s_0|)``

   An unperturbed curve (the score never moves) has ``AUC = 1`` for ``s_0 > 0``; MoRF wants it low, LeRF high, and the
   *gap* ``AUC_LeRF − AUC_MoRF`` is the faithfulness (the larger, the more faithful; ``0`` for a map no better than
   chance). ``AUC`` is NaN where ``s_0 = 0``; a logit close to 0 inflates it, where ``'probability'`` (always > 0) or
   the unnormalised :attr:`PerturbationCurves.area` is the safer aggregate.

Work and devices: everything runs on the device of ``images`` (the model must be there too), in the images' dtype,
under ``torch.no_grad`` with the model in evaluation mode (its modes restored afterwards). The unperturbed images and
every perturbed copy (one per map, order and step) are stacked and run through the model in as few forward passes as
the memory budget allows (:func:`copies_per_pass`); the first pass, of the unperturbed images, measures the model's
largest activation per image to size the others. Results are deterministic for a seed (the noise and random orders come
from the CPU generator).

A map evaluated this way costs ``1 + steps`` forward passes of the image for one order, ``1 + 2·steps`` for MoRF and
LeRF together (:func:`morf_lerf`), and with ``S`` maps of the same images ``(1 + 2·steps·S) / S`` per map
(:func:`forwards_per_map`): the unperturbed pass is shared.
"""
import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F

#: The orders :func:`region_perturbation` knows.
ORDERS = ('morf', 'lerf', 'random')

#: The schedules: how many patches are replaced after step ``k``.
SCHEDULES = ('constant', 'squares')

#: The named baselines; a number is a baseline too.
BASELINES = ('mean', 'uniform', 'blur', 'inpaint')

#: The scores of the target class that are followed.
SCORES = ('logit', 'probability')

#: The per-image faithfulness columns of the project's tables (:meth:`MorfLerf.columns`): the MoRF AUC, the LeRF AUC
#: and their gap LeRF − MoRF.
COLUMNS = ('morf_auc', 'lerf_auc', 'faithfulness_gap')

#: The region-perturbation settings ``evaluate``, ``explain`` and ``sweep`` use unless told otherwise: 8 × 8 patches,
#: 16 steps of one patch each, replaced by the image's mean, following the target logit (lrp-pf-auc's score: the
#: demo model's probabilities saturate at 1.000, where a probability curve stays flat).
DEFAULTS = {'patch_size': 8, 'steps': 16, 'regions_per_step': 1, 'schedule': 'constant', 'baseline': 'mean',
            'score': 'logit', 'seed': 0}

#: The blur baseline's Gaussian σ in units of the patch size.
BLUR_SIGMA_PER_PATCH = 0.5

#: Jacobi sweeps of the inpainting's relaxation per pixel of patch side: enough to bring the fill of a hole one or two
#: patches wide to within a few per cent of the harmonic fill (of a ramp: 0.4 % of its range for one 8 × 8 patch).
INPAINT_RELAXATION_PER_PATCH = 2

#: Bytes the stacked copies of one forward pass may take on the CPU (their largest activation, roughly).
MEMORY_BUDGET = 2 * 2 ** 30

#: Share of the free CUDA memory the stacked copies of one forward pass may take.
CUDA_MEMORY_SHARE = 0.5

#: Activation tensors one copy holds at once during a forward pass, in units of its largest one (input and output of
#: the largest layer, the copy itself and its mask).
ACTIVATIONS_PER_COPY = 4


class FaithfulnessError(ValueError):
    """An input region perturbation cannot evaluate: a wrong shape, a NaN map (naming the image), a bad parameter."""


@dataclass(frozen=True)
class PerturbationCurves:
    """The score of the target class as more and more patches are replaced.

    Attributes
    ----------
    scores: torch.Tensor
        Float64 ``(N, steps + 1)``, or ``(S, N, steps + 1)`` for ``S`` maps per image: column 0 the unperturbed
        image's score (the same for every map), column ``k`` the score after step ``k``.
    replaced: torch.Tensor
        Int64 ``(steps + 1,)``: the number of patches ``n_k`` replaced in column ``k`` (``n_0 = 0``).
    patch_count: int
        The patches ``P`` of the grid.
    settings: dict
        The parameters that made the curves (``patch_size``, ``steps``, ``regions_per_step``, ``schedule``, ``order``,
        ``baseline``, ``score``, ``seed``), for the records.
    """
    scores: torch.Tensor
    replaced: torch.Tensor
    patch_count: int
    settings: dict

    @property
    def area(self):
        """The trapezoid area under each curve over ``k / steps ∈ [0, 1]``, in score units, float64 ``(…, N)``."""
        return torch.trapezoid(self.scores, dx=1 / (self.scores.shape[-1] - 1), dim=-1)

    @property
    def auc(self):
        """``area / |s_0|``, the normalised AUC of the module's docstring, float64 ``(…, N)``; NaN where ``s_0 = 0``."""
        start = self.scores[..., 0].abs()
        return self.area / start.masked_fill(start == 0, math.nan)

    @property
    def fractions(self):
        """The share ``n_k / P`` of the patches replaced in each column, float64 ``(steps + 1,)``."""
        return self.replaced.double() / self.patch_count


@dataclass(frozen=True)
class MorfLerf:
    """The MoRF and the LeRF curves of the same maps, and the faithfulness they give.

    Attributes
    ----------
    morf, lerf: PerturbationCurves
    """
    morf: PerturbationCurves
    lerf: PerturbationCurves

    @property
    def morf_auc(self):
        """Float64 ``(…, N)``: the MoRF AUC, the lower the more faithful."""
        return self.morf.auc

    @property
    def lerf_auc(self):
        """Float64 ``(…, N)``: the LeRF AUC, the higher the more faithful."""
        return self.lerf.auc

    @property
    def gap(self):
        """Float64 ``(…, N)``: ``lerf_auc − morf_auc``, the faithfulness, the larger the better; 0 for chance."""
        return self.lerf_auc - self.morf_auc

    def columns(self):
        """The per-image values for a table, keyed by :data:`COLUMNS`, each float64 ``(…, N)``."""
        return dict(zip(COLUMNS, (self.morf_auc, self.lerf_auc, self.gap)))


def forwards_per_map(steps=16, maps=1, orders=2):
    """Forward passes of one image per map when ``maps`` maps of it are evaluated: ``(1 + orders·steps·maps) / maps``.

    ``orders = 2`` is :func:`morf_lerf` (33 forwards for 16 steps and one map); the unperturbed pass is shared by the
    orders and the maps. A forward pass costs about a third of a gradient, so this over 3 is the expected ratio to a
    gradient per (image, map) when nothing else costs.
    """
    return (1 + orders * steps * maps) / maps


def _is_integer(value):
    return isinstance(value, Integral) and not isinstance(value, bool)


def _image_labels(indices, names):
    """Name images by index, and by name where ``names`` is given, for error messages."""
    return ', '.join(f'{index} ({names[index]!r})' if names is not None else str(index) for index in indices)


def _check_positive_integer(value, name):
    if not _is_integer(value) or value < 1:
        raise FaithfulnessError(f'{name} must be an integer >= 1, got {value!r}')
    return int(value)


def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise FaithfulnessError(f'{name} must be one of {choices}, got {value!r}')
    return value


def _check_baseline(baseline):
    if isinstance(baseline, str) and baseline in BASELINES:
        return baseline
    if isinstance(baseline, Real) and not isinstance(baseline, (bool, str)) and math.isfinite(baseline):
        return float(baseline)
    raise FaithfulnessError(f'baseline must be a finite number or one of {BASELINES}, got {baseline!r}')


def _check_images(images, names):
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FaithfulnessError(f'images must be a floating-point tensor (N, C, H, W), got {shape}')
    if len(images) == 0:
        raise FaithfulnessError('images holds no image')
    if names is not None and len(names) != len(images):
        raise FaithfulnessError(f'{len(names)} names given for {len(images)} images')
    finite = torch.isfinite(images).flatten(1).all(1)
    if not finite.all():
        raise FaithfulnessError(f'image {_image_labels((~finite).nonzero().flatten().tolist(), names)} contains NaN '
                                'or inf values')


def _check_relevance(relevance, images, names):
    """Return ``relevance`` as ``(S, N, C', H, W)`` on the images' device, checked against ``images``."""
    if not isinstance(relevance, torch.Tensor) or relevance.ndim not in (4, 5):
        shape = tuple(relevance.shape) if isinstance(relevance, torch.Tensor) else type(relevance).__name__
        raise FaithfulnessError(f'relevance must be a tensor (N, C, H, W) or (S, N, C, H, W), got {shape}')
    maps = relevance.detach().to(images.device)
    maps = maps[None] if maps.ndim == 4 else maps
    if maps.shape[1] != len(images) or maps.shape[-2:] != images.shape[-2:]:
        raise FaithfulnessError(f'relevance {tuple(relevance.shape)} does not fit the images {tuple(images.shape)}: '
                                f'it needs one map of {tuple(images.shape[-2:])} pixels per image')
    if maps.shape[0] == 0:
        raise FaithfulnessError('relevance holds no map')
    finite = torch.isfinite(maps).flatten(2).all(2)
    if not finite.all():
        bad = (~finite.all(0)).nonzero().flatten().tolist()
        in_maps = (~finite[:, bad[0]]).nonzero().flatten().tolist()
        where = f', in map {in_maps[0]} of {len(maps)} for image {bad[0]},' if relevance.ndim == 5 else ''
        raise FaithfulnessError(f'relevance of image {_image_labels(bad, names)}{where} contains NaN or inf values')
    return maps


def _check_targets(targets, count):
    """Return the targets as an int64 tensor ``(N,)`` (a single index is every image's); range checked later."""
    if _is_integer(targets):
        return torch.full((count,), int(targets), dtype=torch.long)
    try:
        indices = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError) as error:
        raise FaithfulnessError(f'targets must be class indices, got {targets!r}') from error
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise FaithfulnessError(f'targets must hold integer class indices, got dtype {indices.dtype}')
    if indices.ndim == 0:
        return indices.long().expand(count).clone()
    if indices.shape != (count,):
        raise FaithfulnessError(f'targets must be one class index per image ({count}), got shape '
                                f'{tuple(indices.shape)}')
    return indices.long()


def replaced_counts(steps, schedule='constant', regions_per_step=1):
    """The number of patches replaced after each step, ``n_0 = 0, n_1, …, n_steps``, int64 ``(steps + 1,)``.

    ``'constant'``: ``n_k = k · regions_per_step``; ``'squares'``: ``n_k = k²``.
    """
    steps = _check_positive_integer(steps, 'steps')
    schedule = _check_choice(schedule, 'schedule', SCHEDULES)
    regions_per_step = _check_positive_integer(regions_per_step, 'regions_per_step')
    if schedule == 'squares' and regions_per_step != 1:
        raise FaithfulnessError(f"regions_per_step applies to schedule='constant' only (squares replace k² patches "
                                f"after step k), got regions_per_step={regions_per_step}")
    step = torch.arange(steps + 1, dtype=torch.long)
    return step * regions_per_step if schedule == 'constant' else step ** 2


def patch_sums(relevance, patch_size):
    """The relevance summed over channels and over each ``patch_size`` square (zero-padded at the bottom / right).

    Parameters
    ----------
    relevance: torch.Tensor
        ``(…, C, H, W)``.
    patch_size: int

    Returns
    -------
    torch.Tensor
        Float64 ``(…, ⌈H/p⌉, ⌈W/p⌉)``.
    """
    summed = relevance.sum(-3, dtype=torch.float64)
    height, width = summed.shape[-2:]
    rows, columns = -(-height // patch_size), -(-width // patch_size)
    padded = F.pad(summed, (0, columns * patch_size - width, 0, rows * patch_size - height))
    return padded.reshape(*summed.shape[:-2], rows, patch_size, columns, patch_size).sum((-3, -1))


def patch_ranks(sums, order, seed=0):
    """The position of every patch in the replacement order (0 = replaced first), ties by row-major position.

    Parameters
    ----------
    sums: torch.Tensor
        ``(S, N, rows, columns)`` patch sums (:func:`patch_sums`).
    order: str
        ``'morf'``, ``'lerf'`` or ``'random'`` (one permutation per image from a CPU generator seeded with
        ``2·seed``, shared by the ``S`` maps).

    Returns
    -------
    torch.Tensor
        Int64, shaped as ``sums``.
    """
    flat = sums.flatten(2)
    if order == 'random':
        noise = torch.rand(flat.shape[1:], generator=torch.Generator().manual_seed(2 * seed), dtype=torch.float64)
        positions = noise.argsort(dim=-1).to(flat.device).expand_as(flat)
    else:
        positions = flat.sort(dim=-1, descending=order == 'morf', stable=True).indices
    ranks = torch.empty_like(positions).scatter_(
        -1, positions, torch.arange(flat.shape[-1], device=flat.device).expand_as(positions)
    )
    return ranks.reshape(sums.shape)


def gaussian_blur(images, sigma):
    """Blur every channel of ``images`` ``(N, C, H, W)`` with a Gaussian of ``sigma`` pixels.

    The kernel is cut at ``⌊4σ + 0.5⌋`` pixels and normalised to sum 1, and the image is extended by its edge values:
    ``scipy.ndimage.gaussian_filter(mode='nearest', truncate=4)``, done as two 1-D convolutions.
    """
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images)
    channels = images.shape[1]
    blurred = F.pad(images, (radius, radius, radius, radius), mode='replicate')
    blurred = F.conv2d(blurred, kernel.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(blurred, kernel.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def inpaint(images, mask, relaxation_steps):
    """Fill the pixels of ``images`` under ``mask`` from the pixels around them that are not under it.

    Two stages, both batched over the images:

    1. *Onion-peel fill*: every masked pixel that touches a known pixel (of its 3 × 3 neighbourhood) gets the mean of
       its known neighbours and becomes known; repeated until the hole is filled, from the border inwards.
    2. *Relaxation*: ``relaxation_steps`` Jacobi sweeps of Laplace's equation on the masked pixels, each masked pixel
       set to the mean of its four neighbours (the image extended by its edge values), the known pixels held fixed.
       This smooths the streaks the fill leaves towards the harmonic fill, the smoothest continuation of the border.

    Every filled value is a weighted mean of known values, so it lies within their range, and the fill is continuous
    at the hole's border: no constant level and no step edge outlines the mask. An image whose every pixel is masked
    has no surroundings and gets its per-channel mean.

    Parameters
    ----------
    images: torch.Tensor
        ``(B, C, H, W)``.
    mask: torch.Tensor
        Bool ``(B, H, W)``, ``True`` where a pixel is replaced.
    relaxation_steps: int

    Returns
    -------
    torch.Tensor
        Shaped as ``images``; the unmasked pixels unchanged.
    """
    hole = mask[:, None]
    known = (~hole).to(images)
    filled = images * known
    remaining = hole.clone()
    while remaining.any():
        pooled = F.avg_pool2d(torch.cat([filled, known], 1), 3, stride=1, padding=1)
        values, weight = pooled[:, :-1], pooled[:, -1:]
        reached = remaining & (weight > 0)
        if not reached.any():  # nothing known: images wholly masked
            filled = torch.where(remaining, images.mean((2, 3), keepdim=True), filled)
            break
        filled = torch.where(reached, values / weight.clamp(min=torch.finfo(weight.dtype).tiny), filled)
        known = torch.where(reached, 1., known)
        remaining &= ~reached
    neighbours = torch.tensor([[0., .25, 0.], [.25, 0., .25], [0., .25, 0.]], dtype=images.dtype,
                              device=images.device).expand(images.shape[1], 1, 3, 3)
    for _ in range(relaxation_steps):
        mean = F.conv2d(F.pad(filled, (1, 1, 1, 1), mode='replicate'), neighbours, groups=images.shape[1])
        filled = torch.where(hole, mean, filled)
    return filled


def _fills(images, baseline, patch_size, seed):
    """What replaces a pixel of each image: a scalar, ``(N, C, 1, 1)`` means or ``(N, C, H, W)`` images; ``None`` for
    ``'inpaint'``, computed per copy."""
    if isinstance(baseline, float):
        return torch.tensor(baseline, dtype=images.dtype, device=images.device)
    if baseline == 'mean':
        return images.mean((2, 3), keepdim=True)
    if baseline == 'uniform':
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(2 * seed + 1), dtype=torch.float64)
        low = images.flatten(1).amin(1).reshape(-1, 1, 1, 1)
        high = images.flatten(1).amax(1).reshape(-1, 1, 1, 1)
        return low + noise.to(images) * (high - low)
    if baseline == 'blur':
        return gaussian_blur(images, BLUR_SIGMA_PER_PATCH * patch_size)
    return None


def _select_scores(outputs, targets, score):
    """The target's logit or softmax probability of every row of ``outputs`` ``(B, K)``, float64 ``(B,)``."""
    outputs = outputs.double()
    if score == 'probability':
        outputs = outputs.softmax(1)
    return outputs.gather(1, targets[:, None])[:, 0]


class _LargestActivation:
    """Forward hooks on every submodule that record the largest tensor output per image (its element count)."""
    def __init__(self, model):
        self.elements = 0
        self._handles = [module.register_forward_hook(self._record) for module in model.modules()]

    def _record(self, module, inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim > 0 and len(output):
            self.elements = max(self.elements, output.numel() // len(output))

    def remove(self):
        for handle in self._handles:
            handle.remove()


def copies_per_pass(largest_activation, element_size, device):
    """How many image copies one forward pass may stack: the memory budget over one copy's activations, at least 1.

    Parameters
    ----------
    largest_activation: int
        Elements of the model's largest activation for one image.
    element_size: int
        Bytes per element.
    device: torch.device
        On CUDA the budget is :data:`CUDA_MEMORY_SHARE` of the memory free for tensors (free on the device plus
        cached by torch); elsewhere :data:`MEMORY_BUDGET`.
    """
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        budget = CUDA_MEMORY_SHARE * (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    else:
        budget = MEMORY_BUDGET
    return max(1, int(budget // (ACTIVATIONS_PER_COPY * max(1, largest_activation) * element_size)))


def _model_device(model, images):
    devices = {tensor.device for tensor in list(model.parameters()) + list(model.buffers())}
    if devices and devices != {images.device}:
        raise FaithfulnessError(f'the model is on {sorted(map(str, devices))} but the images are on {images.device}; '
                                f'put both on one device')


def _perturbation_scores(model, images, ranks, targets, counts, fills, baseline, patch_size, score, batch_size,
                         names):
    """Run the unperturbed images and every perturbed copy through ``model``; return the scores ``(M, N, steps+1)``.

    ``ranks`` ``(M, N, rows, columns)`` holds each map's replacement order. The copies are the jobs ``(map m, image
    n, step k)``, the ``N`` unperturbed images first, taken ``batch_size`` at a time (by default as many as
    :func:`copies_per_pass` allows, measured on the first pass).
    """
    maps, count = ranks.shape[:2]
    steps = len(counts) - 1
    height, width = images.shape[-2:]
    device = images.device
    job_map = torch.cat([torch.zeros(count, dtype=torch.long),
                         torch.arange(maps).repeat_interleave(count * steps)]).to(device)
    job_image = torch.cat([torch.arange(count),
                           torch.arange(count).repeat_interleave(steps).repeat(maps)]).to(device)
    job_count = torch.cat([torch.zeros(count, dtype=torch.long), counts[1:].repeat(maps * count)]).to(device)
    targets = targets.to(device)
    scores = torch.empty(len(job_map), dtype=torch.float64, device=device)
    relaxation_steps = INPAINT_RELAXATION_PER_PATCH * patch_size
    start, chunk = 0, batch_size or count
    while start < len(job_map):
        jobs = slice(start, min(start + chunk, len(job_map)))
        image = job_image[jobs]
        mask = ranks[job_map[jobs], image] < job_count[jobs, None, None]
        mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, :height, :width]
        originals = images[image]
        if baseline == 'inpaint':
            fill = inpaint(originals, mask, relaxation_steps)
        else:
            fill = fills if fills.ndim == 0 else fills[image]
        copies = torch.where(mask[:, None], fill, originals)
        probe = _LargestActivation(model) if start == 0 and batch_size is None else None
        try:
            outputs = model(copies)
        finally:
            if probe is not None:
                probe.remove()
        if start == 0:
            if outputs.ndim != 2 or len(outputs) != len(copies):
                raise FaithfulnessError(f'the model must map (N, C, H, W) to logits (N, K), got output shape '
                                        f'{tuple(outputs.shape)} for {len(copies)} images')
            outside = ((targets < 0) | (targets >= outputs.shape[1])).nonzero().flatten().tolist()
            if outside:
                raise FaithfulnessError(f'target of image {_image_labels(outside, names)} is class '
                                        f'{targets[outside[0]].item()}, but the model has {outputs.shape[1]} classes')
            if probe is not None:
                chunk = copies_per_pass(probe.elements, images.element_size(), device)
        scores[jobs] = _select_scores(outputs, targets[image], score)
        start = jobs.stop
    unperturbed = scores[:count]
    perturbed = scores[count:].reshape(maps, count, steps)
    return torch.cat([unperturbed.expand(maps, count)[..., None], perturbed], dim=-1)


def _perturbation_curves(model, images, relevance, targets, orders, patch_size, steps, regions_per_step, schedule,
                         baseline, score, seed, batch_size, names):
    """Validate everything, then compute the curves of every order in ``orders`` from one stack of copies."""
    _check_images(images, names)
    patch_size = _check_positive_integer(patch_size, 'patch_size')
    counts = replaced_counts(steps, schedule, regions_per_step)
    baseline = _check_baseline(baseline)
    score = _check_choice(score, 'score', SCORES)
    if not _is_integer(seed):
        raise FaithfulnessError(f'seed must be an integer, got {seed!r}')
    if batch_size is not None:
        batch_size = _check_positive_integer(batch_size, 'batch_size')
    maps = _check_relevance(relevance, images, names)
    targets = _check_targets(targets, len(images))
    height, width = images.shape[-2:]
    patch_count = -(-height // patch_size) * -(-width // patch_size)
    if counts[-1] > patch_count:
        raise FaithfulnessError(
            f'{steps} steps of the {schedule!r} schedule replace {int(counts[-1])} patches, but a {height}×{width} '
            f'image has {patch_count} patches of {patch_size}×{patch_size}: use fewer steps or smaller patches'
        )
    _model_device(model, images)

    sums = patch_sums(maps, patch_size)
    ranks = torch.cat([patch_ranks(sums, order, seed) for order in orders])
    fills = _fills(images, baseline, patch_size, seed)
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            scores = _perturbation_scores(model, images.detach(), ranks, targets, counts, fills, baseline, patch_size,
                                          score, batch_size, names)
    finally:
        for module, flag in training.items():
            module.train(flag)
    settings = dict(patch_size=patch_size, steps=int(steps), regions_per_step=int(regions_per_step),
                    schedule=schedule, baseline=baseline, score=score, seed=int(seed))
    curves = {}
    for index, order in enumerate(orders):
        part = scores[index * len(maps):(index + 1) * len(maps)]
        curves[order] = PerturbationCurves(part if relevance.ndim == 5 else part[0], counts, patch_count,
                                           {**settings, 'order': order})
    return curves


def region_perturbation(model, images, relevance, targets, *, patch_size=8, steps=16, regions_per_step=1,
                        schedule='constant', order='morf', baseline='mean', score='logit', seed=0, batch_size=None,
                        names=None):
    """The score of the target class as the patches of the images are replaced in the order of their relevance.

    The procedure, the AUC and how the work is batched are in the module's docstring.

    Parameters
    ----------
    model: torch.nn.Module
        A classifier ``(N, C, H, W) -> (N, K)`` logits, on the images' device. Used in evaluation mode (its modes are
        restored afterwards), without gradients.
    images: torch.Tensor
        ``(N, C, H, W)`` floating point, finite, preprocessed as the model expects.
    relevance: torch.Tensor
        ``(N, C', H, W)`` one map per image, or ``(S, N, C', H, W)`` ``S`` maps per image (e.g. every setting of a
        sweep); summed over its ``C'`` channels. Moved to the images' device.
    targets: int, sequence of int or torch.Tensor
        The class each map explains: one for all images or ``(N,)``.
    patch_size: int
        The side of the square patches, in pixels.
    steps: int
        Perturbation steps; the curve has ``steps + 1`` points.
    regions_per_step: int
        Patches replaced per step by the ``'constant'`` schedule (1 for ``'squares'``).
    schedule: str
        ``'constant'`` or ``'squares'``.
    order: str
        ``'morf'``, ``'lerf'`` or ``'random'``.
    baseline: float or str
        A number, ``'mean'``, ``'uniform'``, ``'blur'`` or ``'inpaint'``.
    score: str
        ``'logit'`` or ``'probability'``.
    seed: int
        Seeds the ``'random'`` order and the ``'uniform'`` noise.
    batch_size: int, optional
        Image copies per forward pass; by default as many as the memory budget allows (:func:`copies_per_pass`).
    names: sequence of str, optional
        One name per image, for error messages.

    Returns
    -------
    PerturbationCurves
        ``scores`` ``(N, steps + 1)`` (``(S, N, steps + 1)`` for 5-D relevance) and the normalised ``auc``.

    Raises
    ------
    FaithfulnessError
        Before any forward pass: for a parameter outside its range or choices, images that are not 4-D floating point
        or hold NaN/inf, relevance of another shape or with NaN/inf (naming the image, and the map), targets of the
        wrong shape or type, a schedule that replaces more patches than the image has, a model on another device.
        After the first forward pass (of the unperturbed images, and of the first copies if ``batch_size`` exceeds
        their number): a target class the model does not have, a model output that is not ``(N, K)``.
    """
    order = _check_choice(order, 'order', ORDERS)
    return _perturbation_curves(model, images, relevance, targets, (order,), patch_size, steps, regions_per_step,
                                schedule, baseline, score, seed, batch_size, names)[order]


def morf_lerf(model, images, relevance, targets, *, patch_size=8, steps=16, regions_per_step=1, schedule='constant',
              baseline='mean', score='logit', seed=0, batch_size=None, names=None):
    """The MoRF and the LeRF curves of the same maps in one stack of forward passes (the unperturbed pass shared).

    The parameters are :func:`region_perturbation`'s (without ``order``); the result's ``morf`` and ``lerf`` equal that
    function's for ``order='morf'`` and ``'lerf'``. ``1 + 2·steps`` forward passes per image for one map
    (:func:`forwards_per_map`).

    Returns
    -------
    MorfLerf
        With ``morf_auc``, ``lerf_auc`` and ``gap`` (LeRF − MoRF) per image.
    """
    curves = _perturbation_curves(model, images, relevance, targets, ('morf', 'lerf'), patch_size, steps,
                                  regions_per_step, schedule, baseline, score, seed, batch_size, names)
    return MorfLerf(curves['morf'], curves['lerf'])


def settings(overrides=None):
    """The region-perturbation settings the project's commands use: :data:`DEFAULTS` updated by ``overrides``.

    Raises
    ------
    FaithfulnessError
        For a name :data:`DEFAULTS` does not have (the values are checked where they are used).
    """
    chosen = {**DEFAULTS, **(overrides or {})}
    unknown = sorted(set(chosen) - set(DEFAULTS))
    if unknown:
        raise FaithfulnessError(f'unknown perturbation settings {unknown}; known: {sorted(DEFAULTS)}')
    return chosen


def columns(model, images, relevance, targets, perturbation, names=None):
    """The :data:`COLUMNS` of each map by :func:`morf_lerf` with the settings ``perturbation``, as lists of floats
    for a table: ``relevance`` ``(N, ...)`` gives ``N`` values per column, ``(S, N, ...)`` (``S`` maps per image)
    ``S`` lists of ``N``. The images, maps and targets are moved to the model's device first."""
    parameter = next(model.parameters())
    curves = morf_lerf(model, images.to(parameter), relevance.to(parameter), torch.as_tensor(targets).to(
        parameter.device), names=names, **perturbation)
    return {name: values.tolist() for name, values in curves.columns().items()}
