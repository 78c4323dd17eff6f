"""The sweep engine: LRP relevance of a whole ε×γ grid of rule settings, computed sharing what the settings share.

:class:`SweepEngine` gives, for every ``(ε, γ)`` of a grid, the relevance that
:class:`lrp_brain.composites.VGGComposite` ``(ε, γ, low, high, ...)`` gives through a Zennit ``Gradient`` attributor
(to rounding), without hooks or autograd: it walks the network's leaf modules itself. The rules' maths is not written
here: each step is a thin adapter that calls the functions of :mod:`lrp_brain.rules` (the same ones the Zennit hooks
call) with many settings at once, as a leading dimension in front of the batch. Three facts make a grid cheap:

* The forward pass (every layer's input ``x`` and output ``z``) is the same for every setting: it runs once per batch,
  and with it every γ- and ε-independent quantity (``W⁺x``, the z^B and LRP-0 denominators, the max-pool winners).
* With the denominators fixed, every rule is linear in the relevance it receives, and ε acts only above the last
  γ layer, γ only below it. The part above (ε convolutions, fully connected layers) runs once per ε, many ε's as
  one batch; its output, the relevance at the boundary, then runs through the part below (γ convolutions, z^B) once
  per γ, with the ε's of that γ as one batch.
* Zennit's generalised LRP-γ has terms for negative inputs and for relevance on negative outputs. Behind a ReLU
  neither exists: the inputs are checked once per batch, and whether relevance can reach an output ``≤ 0`` follows
  from the layers above (:func:`_mark_vanishing`). What is left is one transposed convolution with ``W + γW⁺`` of
  ``R / stab(z + γ(W⁺x + b⁺))`` per layer (:func:`lrp_brain.rules.gamma_shared_part`), and one γ per batch lets
  ``W + γW⁺`` be one tensor. The other terms are computed where they exist, so the result stays exact for any
  network.

Memory: the forward caches hold a few copies of every activation of the batch (~0.25 GB per 224² image for VGG16,
whatever the grid; the batch is the caller's to choose); the relevance pass holds about
:data:`RELEVANCE_COPIES` copies of the largest activation below the boundary per (setting, image) of a chunk. The
chunk (how many ε's go through the network together) defaults to the most that keep that under
:data:`MEMORY_BUDGET` bytes, at least one. A 224² VGG16 with one image and the 11×11 grid peaks at about 1 GB above
the model's own weights.
"""
import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lrp_brain import rules
from lrp_brain.composites import STABILIZER, VGGComposite, check_input_bounds
from lrp_brain.contrast import ContrastError, check_contrast, input_relevance
from lrp_brain.contrast import output_relevance as contrast_relevance

#: Bytes the relevance pass of one chunk of settings may use by default (see :class:`SweepEngine`).
MEMORY_BUDGET = 2 * 2 ** 30

#: Copies of the largest activation below the γ/ε boundary that the relevance pass holds per (setting, image) at its
#: peak (measured on VGG16: ~5.2): the incoming relevance, its ratio to the denominators, the transposed
#: convolution's output and the result, and the convolution's working memory.
RELEVANCE_COPIES = 6


class SweepError(ValueError):
    """A model, grid or input the sweep cannot handle; the message names the layer, parameter or value at fault."""


class _Step:
    """One leaf module in the engine's forward and relevance pass; this base passes relevance on unchanged.

    A step lives for one batch: :meth:`forward` computes the module's output and keeps what the relevance pass needs,
    :meth:`set_gamma` fixes γ for the following :meth:`backward` calls, and :meth:`backward` maps the relevance of
    the output, shaped ``(S, N, *output_shape)`` for ``S`` settings of the ``N`` images, to that of the input. The
    base is the rule of activations (Pass), dropout, flattening and identities.

    :func:`_mark_vanishing` sets ``output_relevance_vanishes``: whether the relevance reaching the output is known to
    be zero wherever the output is ``≤ 0`` (then LRP-γ can skip the terms of negative outputs).
    """
    #: Modules whose output is ``≤ 0`` exactly where their input is, so that Pass keeps relevance vanishing there.
    SIGN_KEEPING = (nn.ReLU, nn.Dropout, nn.Flatten, nn.Identity)

    def __init__(self, module, options):
        self.module = module
        self.options = options
        self.output_relevance_vanishes = False

    def forward(self, inputs):
        self.input_shape = inputs.shape[1:]
        outputs = self._forward(inputs)
        self.output_shape = outputs.shape[1:]
        return outputs

    def _forward(self, inputs):
        # an in-place activation would overwrite the output of the layer below, which that layer's step keeps
        return self.module(inputs.clone() if getattr(self.module, 'inplace', False) else inputs)

    def input_relevance_vanishes(self, output_relevance_vanishes):
        """Whether the relevance this step passes down is zero wherever its input is ``≤ 0``."""
        return output_relevance_vanishes and isinstance(self.module, self.SIGN_KEEPING)

    def set_gamma(self, gamma):
        """Fix γ for the following :meth:`backward` calls (nothing to do for steps without γ)."""

    def backward(self, relevance, epsilon):
        """Return the relevance of the input; ``epsilon`` holds the ε of each of the ``S`` settings, shape ``(S,)``."""
        return relevance


class _ScaleStep(_Step):
    """A BatchNorm in evaluation mode that a canonizer merged into the layer before it: its gradient, a per-channel
    scaling (1, or ``1/sqrt(1 + eps)`` where Zennit 0.5 leaves the BatchNorm's ``eps``)."""
    def _forward(self, inputs):
        module = self.module
        weight = module.weight.detach() if module.weight is not None else torch.ones_like(module.running_var)
        self.scale = (weight / (module.running_var + module.eps) ** .5).reshape(-1, *([1] * (inputs.ndim - 2)))
        return module(inputs)

    def input_relevance_vanishes(self, output_relevance_vanishes):
        # a positive scaling: every BatchNorm the engine accepts has weight 1 and running variance 1
        return output_relevance_vanishes

    def backward(self, relevance, epsilon):
        return relevance * self.scale


class _MaxPoolStep(_Step):
    """Max-pooling, :func:`lrp_brain.rules.winner_takes_all`.

    An input ``≤ 0`` either wins nowhere or gives its value to an output ``≤ 0``, so relevance vanishing at outputs
    ``≤ 0`` vanishes at inputs ``≤ 0``.
    """
    def _forward(self, inputs):
        module = self.module
        if isinstance(module, nn.AdaptiveMaxPool2d):
            outputs, self.indices = F.adaptive_max_pool2d(inputs, module.output_size, return_indices=True)
        else:
            outputs, self.indices = F.max_pool2d(
                inputs, module.kernel_size, module.stride, module.padding, module.dilation,
                ceil_mode=module.ceil_mode, return_indices=True,
            )
        return outputs

    def input_relevance_vanishes(self, output_relevance_vanishes):
        return output_relevance_vanishes

    def backward(self, relevance, epsilon):
        return rules.winner_takes_all(self.indices, relevance, self.indices.shape[:1] + self.input_shape)


class _WeightedStep(_Step):
    """Base of the rules that weight the relevance by the input, ``R_in = x ⊙ (...)``: zero wherever ``x = 0``, so
    zero wherever ``x ≤ 0`` when no input is negative."""
    def forward(self, inputs):
        self.inputs = inputs
        self.nonnegative_input = not bool((inputs < 0).any())
        return super().forward(inputs)

    def input_relevance_vanishes(self, output_relevance_vanishes):
        return self.nonnegative_input

    def parameters(self):
        """The weight and the bias the rule sees (:func:`lrp_brain.rules.rule_parameters`)."""
        return rules.rule_parameters(self.module, ['bias'] if self.options['zero_bias'] else None)


class _NormStep(_WeightedStep):
    """Norm on average pools, :func:`lrp_brain.rules.norm_relevance`."""
    def _forward(self, inputs):
        outputs = self.module(inputs)
        self.denominator = rules.stabilize(outputs, STABILIZER)
        return outputs

    def backward(self, relevance, epsilon):
        return rules.norm_relevance(self.module, self.inputs, relevance, self.denominator)


class _EpsilonStep(_WeightedStep):
    """LRP-ε, :func:`lrp_brain.rules.epsilon_relevance`: the swept ε (times the per-image std of ``z`` with
    ``std_epsilon``), one per setting, or the fixed :data:`STABILIZER` (LRP-0) where ``sweeps_epsilon`` is ``False``."""
    def __init__(self, module, options, sweeps_epsilon):
        super().__init__(module, options)
        self.sweeps_epsilon = sweeps_epsilon

    def _forward(self, inputs):
        outputs = self.module(inputs)
        self.weight, bias = self.parameters()
        self.rule_output = rules.rule_output(self.module, inputs, outputs, self.weight, bias)
        if not self.sweeps_epsilon:
            self.denominator = rules.stabilize(self.rule_output, STABILIZER)
        return outputs

    def backward(self, relevance, epsilon):
        if self.sweeps_epsilon:
            stabilizer = rules.per_setting(epsilon, self.rule_output.ndim)
            if self.options['std_epsilon']:
                stabilizer = rules.StdStabilizer(stabilizer)
            denominator = rules.stabilize(self.rule_output, stabilizer)
        else:
            denominator = self.denominator
        return rules.epsilon_relevance(self.module, self.inputs, relevance, self.weight, denominator)


class _GammaStep(_WeightedStep):
    """LRP-γ, :func:`lrp_brain.rules.gamma_relevance`, with the denominators of every γ from the γ-independent part
    of :func:`lrp_brain.rules.gamma_shared_part`, computed once per batch.

    Terms that are zero are skipped: ``x⁻`` for non-negative input, the ``g⁻`` terms when the relevance is known to
    vanish at outputs ``≤ 0`` (a ReLU above), else when it does not reach them, leaving one transposed convolution per
    batch of settings for a ReLU network.
    """
    def _forward(self, inputs):
        self.outputs = self.module(inputs)
        self.weight, bias = self.parameters()
        self.input_parts = (inputs, None) if self.nonnegative_input else (inputs.clamp(min=0), inputs.clamp(max=0))
        self.rule_output, self.shared_part = rules.gamma_shared_part(
            self.module, inputs, self.input_parts, self.outputs, self.weight, bias
        )
        return self.outputs

    def set_gamma(self, gamma):
        signs = (1,) if self.output_relevance_vanishes else (1, -1)
        denominators = [
            rules.gamma_masked_denominator(
                torch.add(self.rule_output, self.shared_part, alpha=gamma), self.outputs, STABILIZER, sign
            )[0] for sign in signs
        ]
        self.denominators = (denominators + [None])[:2]
        self.weights = tuple(rules.gamma_parameters(self.weight, None, gamma, sign)[0] for sign in (1, -1))

    def backward(self, relevance, epsilon):
        positive, negative = self.denominators
        if negative is not None and not rules.reaches_masked(relevance, positive):
            negative = None
        return rules.gamma_relevance(self.module, self.input_parts, relevance, self.weights, (positive, negative))


class _ZBoxStep(_WeightedStep):
    """z^B, :func:`lrp_brain.rules.zbox_relevance`, with the bounds ``low``, ``high`` (``None``: each image's own,
    see :func:`lrp_brain.rules.input_bounds`), checked against the input as the composite does when the option
    ``checked_layer`` names the layer."""
    def _forward(self, inputs):
        if self.options['checked_layer'] is not None:
            try:
                check_input_bounds(self.options['checked_layer'], inputs, self.options['low'], self.options['high'])
            except ValueError as error:
                raise SweepError(str(error)) from error
        outputs = self.module(inputs)
        self.low, self.high = rules.input_bounds(self.module, inputs, self.options['low'], self.options['high'])
        self.weights, self.denominator, _ = rules.zbox_prepare(
            self.module, inputs, outputs, self.low, self.high, *self.parameters(), STABILIZER
        )
        return outputs

    def input_relevance_vanishes(self, output_relevance_vanishes):
        return False

    def backward(self, relevance, epsilon):
        return rules.zbox_relevance(self.module, self.inputs, relevance, self.weights, self.low, self.high,
                                    self.denominator)



def _mark_vanishing(steps):
    """Set each step's ``output_relevance_vanishes``, walking down from the output, whose relevance (one-hot or
    contrastive) sits on logits of any sign."""
    vanishes = False
    for step in reversed(steps):
        step.output_relevance_vanishes = vanishes
        vanishes = step.input_relevance_vanishes(vanishes)


#: The step of each layer group of :meth:`lrp_brain.composites.VGGComposite.layer_rules`.
_STEPS = {
    'first_conv': _ZBoxStep,
    'gamma_conv': _GammaStep,
    'epsilon_conv': partial(_EpsilonStep, sweeps_epsilon=True),
    'epsilon_linear': partial(_EpsilonStep, sweeps_epsilon=True),
    'linear': partial(_EpsilonStep, sweeps_epsilon=False),
    'activation': _Step,
    'identity': _Step,
    'avgpool': _NormStep,
    'maxpool': _MaxPoolStep,
    'batchnorm': _ScaleStep,
}


def _grid_values(name, values, check):
    """Return ``values`` as a list of floats, each validated by ``check(value)`` (a VGGComposite constructor)."""
    try:
        values = [float(value) for value in values]
    except (TypeError, ValueError) as error:
        raise SweepError(f'{name} must be a sequence of numbers, got {values!r}') from error
    if not values:
        raise SweepError(f'{name} is empty; the sweep needs at least one value')
    for index, value in enumerate(values):
        try:
            check(value)
        except ValueError as error:
            raise SweepError(f'{name}[{index}] = {value:g}: {error}') from error
    return values


def _check_layer(row, module):
    """Refuse a layer the engine cannot reproduce Zennit on."""
    if row.group == 'uncovered':
        raise SweepError(
            f'layer {row.name} ({row.module}) is not covered by the rule mapping; the sweep engine refuses it'
        )
    if isinstance(module, rules.LAYERS):
        try:
            rules.check_module(module)
        except rules.RuleError as error:
            raise SweepError(f'layer {row.name}: {error}') from error
    if row.group == 'batchnorm':
        statistics = [module.running_mean, module.running_var]
        affine = [module.weight, module.bias] if module.affine else []
        merged = all(tensor is not None for tensor in statistics) and all(
            bool((tensor.detach() == expected).all())
            for tensor, expected in zip(statistics + affine, (0., 1., 1., 0.))
        )
        if not merged:
            raise SweepError(
                f'BatchNorm {row.name} is not merged into the layer before it by the composite\'s canonizers '
                f'(it must follow a convolution or linear layer, with running statistics); LRP through it is undefined'
            )


class SweepEngine:
    """LRP relevance of a VGG network for every setting of an ε×γ grid, sharing the work the settings share.

    Each ``(epsilons[i], gammas[j])`` gives the relevance of :class:`lrp_brain.composites.VGGComposite` ``(epsilon,
    gamma, low, high, **options)`` through a Zennit ``Gradient`` attributor with a one-hot (or ``contrast``'s) output
    relevance, to rounding (see the module's docstring for how). The rule mapping is the composite's own
    (:meth:`~lrp_brain.composites.VGGComposite.layer_rules`), so the two cannot disagree.

    Parameters
    ----------
    model: torch.nn.Module
        A VGG-like network in evaluation mode whose forward pass is its leaf modules in order (a flattening before
        the first fully connected layer allowed). Models with BatchNorm are canonized on a deep copy with the
        composite's canonizers; BatchNorms they cannot merge are refused, as are layers without a rule. The weights are
        read at each call (of the copy, for BatchNorm models).
    epsilons, gammas: sequence of float
        The grid. Validated as :class:`~lrp_brain.composites.VGGComposite` validates one value; ε = 0 is LRP-0
        (stabilised by :data:`~lrp_brain.composites.STABILIZER`).
    low, high: float, torch.Tensor or None
        The z^B bounds of the first layer, as for the composite: ``None`` (both) takes each image's own per-channel
        minimum and maximum (:func:`lrp_brain.rules.input_bounds`).
    epsilon_from_block, epsilon_linears, std_epsilon, zero_bias, allow_negative, check_bounds:
        As for :class:`~lrp_brain.composites.VGGComposite`; with ``check_bounds`` (and bounds given) the images of
        every call are checked against the bounds (:func:`~lrp_brain.composites.check_input_bounds`).
    settings_chunk: int, optional
        How many ε's go through the network as one batch (for one γ below the boundary). By default as many as keep
        the relevance pass under :data:`MEMORY_BUDGET` bytes (all of them for one 224² image), at least one.
    contrast: str, optional
        The output relevance, as for :func:`lrp_brain.explain.explain` (:mod:`lrp_brain.contrast`): one-hot at the
        targets (``None``), SGLRP or CLRP (whose positive part is taken of every setting's map after the pass).

    Raises
    ------
    SweepError
        For an invalid grid value or option, a model that is not VGG-like, in training mode, with a layer the rule
        mapping does not cover, or a BatchNorm the canonizers cannot merge; at a call, for images outside given
        bounds.
    """
    def __init__(self, model, epsilons, gammas, low=None, high=None, *, epsilon_from_block=4, epsilon_linears=0,
                 std_epsilon=False, zero_bias=False, allow_negative=False, check_bounds=True, settings_chunk=None,
                 contrast=None):
        options = dict(
            epsilon_from_block=epsilon_from_block, epsilon_linears=epsilon_linears, std_epsilon=std_epsilon,
            zero_bias=zero_bias, allow_negative=allow_negative,
        )
        try:
            composite = VGGComposite(0., 0., low, high, **options)
        except ValueError as error:
            raise SweepError(str(error)) from error
        self.epsilons = _grid_values('epsilons', epsilons, lambda value: VGGComposite(value, 0., low, high, **options))
        self.gammas = _grid_values('gammas', gammas, lambda value: VGGComposite(0., value, low, high, **options))
        if settings_chunk is not None and (int(settings_chunk) != settings_chunk or settings_chunk < 1):
            raise SweepError(f'settings_chunk must be an integer >= 1 or None, got {settings_chunk!r}')
        self.settings_chunk = None if settings_chunk is None else int(settings_chunk)
        try:
            self.contrast = check_contrast(contrast)
        except ContrastError as error:
            raise SweepError(str(error)) from error
        if model.training:
            raise SweepError(f'{type(model).__name__} is in training mode; call model.eval() before the sweep')
        try:
            rows = composite.layer_rules(model)
        except ValueError as error:
            raise SweepError(str(error)) from error
        if any(row.group == 'batchnorm' for row in rows):
            model = copy.deepcopy(model)
            for canonizer in composite.canonizers:
                canonizer.apply(model)
            rows = composite.layer_rules(model)
        modules = dict(model.named_modules())
        for row in rows:
            _check_layer(row, modules[row.name])
        self.model = model
        self._layers = [(_STEPS[row.group], modules[row.name]) for row in rows]
        # everything up to the last layer whose rule depends on γ (or has fixed relevance below: z^B) is below the
        # boundary; everything above depends on ε only
        self._boundary = 1 + max(
            index for index, row in enumerate(rows) if row.group in ('gamma_conv', 'first_conv')
        )
        first = next(row.name for row in rows if row.group == 'first_conv')
        self._rule_options = dict(low=low, high=high, std_epsilon=bool(std_epsilon), zero_bias=bool(zero_bias),
                                  checked_layer=first if low is not None and check_bounds else None)

    def relevance(self, images, targets):
        """Return the relevance of every setting.

        Parameters
        ----------
        images: torch.Tensor
            ``(N, C, H, W)``, cast to the model's dtype and device.
        targets: torch.Tensor
            ``(N,)`` class indices: the output relevance is one-hot at each target (or the engine's contrast's).

        Returns
        -------
        torch.Tensor
            ``(len(epsilons), len(gammas), N, C, H, W)``.
        """
        result = None
        for eps_index, gamma_index, relevance in self.iter_relevance(images, targets):
            if result is None:
                result = relevance.new_empty(len(self.epsilons), len(self.gammas), *relevance.shape)
            result[eps_index, gamma_index] = relevance
        return result

    @torch.no_grad()
    def iter_relevance(self, images, targets, settings=None):
        """Yield the relevance setting by setting, so that only one chunk of settings is held at a time.

        Parameters
        ----------
        images, targets:
            As for :meth:`relevance`.
        settings: iterable of (int, int), optional
            The ``(eps_index, gamma_index)`` pairs to compute (default: the whole grid). The others are not computed:
            an ε none of them has is skipped above the boundary, a γ none of them has below it, and below it each γ
            runs only its own ε's.

        Yields
        ------
        eps_index: int
            Index into ``epsilons``.
        gamma_index: int
            Index into ``gammas``.
        relevance: torch.Tensor
            ``(N, C, H, W)``: the relevance of the images under ``(epsilons[eps_index], gammas[gamma_index])``. The
            order is γ by γ, ε by ε within each γ.
        """
        parameter = next(self.model.parameters())
        images = torch.as_tensor(images).to(device=parameter.device, dtype=parameter.dtype)
        if images.ndim != 4:
            raise SweepError(f'images must be shaped (N, C, H, W), got {tuple(images.shape)}')
        steps = [make_step(module, self._rule_options) for make_step, module in self._layers]
        outputs = self._forward(steps, images)
        _mark_vanishing(steps)
        targets = self._check_targets(targets, outputs)
        batch = images.shape[0]
        try:
            output_relevance = contrast_relevance(outputs, targets, self.contrast)
        except ContrastError as error:
            raise SweepError(str(error)) from error
        # ε = 0 is LRP-0, stabilised as the composite does
        shifts = torch.tensor([value or STABILIZER for value in self.epsilons], dtype=outputs.dtype,
                              device=outputs.device)
        chunk = self._chunk_size(steps[:self._boundary], batch, outputs.element_size())
        epsilons_of = self._epsilons_of(settings)  # {γ index: its ε indices}, in grid order
        computed = sorted(set().union(*epsilons_of.values()))
        position = {eps_index: offset for offset, eps_index in enumerate(computed)}
        below, above = steps[:self._boundary], steps[self._boundary:]
        boundary_relevance = torch.cat([
            _propagate(above, output_relevance.expand(len(part), *output_relevance.shape), shifts[part])
            for part in _chunks(computed, chunk)
        ]) if computed else None
        for gamma_index, eps_indices in epsilons_of.items():
            for step in below:
                step.set_gamma(self.gammas[gamma_index])
            for part in _chunks(eps_indices, chunk):
                relevance = input_relevance(
                    _propagate(below, boundary_relevance[[position[index] for index in part]], None), self.contrast)
                for offset, eps_index in enumerate(part):
                    yield eps_index, gamma_index, relevance[offset]

    def _epsilons_of(self, settings):
        """``{gamma_index: [eps_index, ...]}`` of the ``settings`` pairs (all by default), both in grid order, the
        γ's without a setting left out; an index outside the grid is refused."""
        if settings is None:
            return {gamma_index: list(range(len(self.epsilons))) for gamma_index in range(len(self.gammas))}
        pairs = set()
        for pair in settings:
            eps_index, gamma_index = pair
            if not (0 <= eps_index < len(self.epsilons) and 0 <= gamma_index < len(self.gammas)):
                raise SweepError(f'settings: ({eps_index}, {gamma_index}) is not an (eps_index, gamma_index) of the '
                                 f'{len(self.epsilons)}x{len(self.gammas)} grid')
            pairs.add((int(eps_index), int(gamma_index)))
        return {gamma_index: [eps_index for eps_index in range(len(self.epsilons)) if (eps_index, gamma_index) in pairs]
                for gamma_index in range(len(self.gammas)) if any(pair[1] == gamma_index for pair in pairs)}

    def _forward(self, steps, images):
        """Run the steps' forward pass and check it against the model's own."""
        outputs = images
        for step in steps:
            if isinstance(step.module, nn.Linear) and outputs.ndim > 2:
                outputs = outputs.flatten(1)
            outputs = step.forward(outputs)
        expected = self.model(images)
        if expected.shape != outputs.shape or not torch.allclose(
            outputs, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())
        ):
            raise SweepError(
                f'the forward pass of {type(self.model).__name__} is not the chain of its leaf modules in order; the '
                f'sweep engine supports sequential VGG-like models only'
            )
        return outputs

    @staticmethod
    def _check_targets(targets, outputs):
        targets = torch.as_tensor(targets, device=outputs.device)
        if targets.dtype != torch.long or targets.shape != outputs.shape[:1]:
            raise SweepError(
                f'targets must be a LongTensor of {outputs.shape[0]} class indices, got {targets.dtype} '
                f'{tuple(targets.shape)}'
            )
        if targets.numel() and (targets.min() < 0 or targets.max() >= outputs.shape[1]):
            raise SweepError(f'targets must lie in [0, {outputs.shape[1]}), got {targets.tolist()}')
        return targets

    def _chunk_size(self, below, batch, element_size):
        """How many ε's go through the network together (see :data:`MEMORY_BUDGET`)."""
        if self.settings_chunk is not None:
            return self.settings_chunk
        largest = max(step.output_shape.numel() for step in below)
        per_setting = RELEVANCE_COPIES * largest * element_size * batch
        return max(1, min(len(self.epsilons), MEMORY_BUDGET // per_setting))


def _chunks(indices, size):
    """``indices`` in consecutive pieces of ``size``."""
    return [indices[start:start + size] for start in range(0, len(indices), size)]


def _propagate(steps, relevance, epsilon):
    """Take ``relevance`` ``(S, N, ...)`` at the output of ``steps`` down to their input, reshaping between steps."""
    settings, batch = relevance.shape[:2]
    for step in reversed(steps):
        relevance = step.backward(relevance.reshape(settings, batch, *step.output_shape), epsilon)
    return relevance
