"""The ε×γ sweep: LRP relevance of a whole grid of rule settings, computed sharing what the settings share.

Engine
======
:class:`SweepEngine` gives, for every ``(ε, γ)`` of a grid, the relevance that
:class:`lrp_brain.composites.VGGComposite` ``(ε, γ, low, high, ...)`` gives through a Zennit ``Gradient`` attributor
(to rounding), without hooks or autograd: it walks the network's leaf modules itself with the rules written out as
tensor operations. Three facts make a grid cheap:

* The forward pass (every layer's input ``x`` and output ``z``) is the same for every setting: it runs once per batch,
  and with it every γ- and ε-independent quantity (``W⁺x``, the z^B and LRP-0 denominators, the max-pool winners).
* With the denominators fixed, every rule is linear in the relevance it receives, and ε acts only above the last
  γ layer, γ only below it. The part above (ε convolutions, fully connected layers) runs once per ε, many ε's as
  one batch; its output, the relevance at the boundary, then runs through the part below (γ convolutions, z^B) once
  per γ, with the ε's of that γ as one batch.
* Zennit's generalised LRP-γ has terms for negative inputs and for relevance on negative outputs. Behind a ReLU
  neither exists: the inputs are checked once per batch, and whether relevance can reach an output ``≤ 0`` follows
  from the layers above (:func:`_mark_vanishing`). What is left is one transposed convolution with ``W + γW⁺`` of
  ``R / stab(z + γ(W⁺x + b⁺))`` per layer, and one γ per batch lets ``W + γW⁺`` be one tensor. The other terms are
  computed where they exist (see :class:`_GammaStep`), so the result stays exact for any network.

Memory: the forward caches hold a few copies of every activation of the batch (~0.25 GB per 224² image for VGG16,
whatever the grid; the batch is the caller's to choose); the relevance pass holds about
:data:`RELEVANCE_COPIES` copies of the largest activation below the boundary per (setting, image) of a chunk. The
chunk (how many ε's go through the network together) defaults to the most that keep that under
:data:`MEMORY_BUDGET` bytes, at least one. A 224² VGG16 with one image and the 11×11 grid peaks at about 1 GB above
the model's own weights.
"""
import copy
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input
from zennit.core import expand

from lrp_brain import distributed
from lrp_brain.composites import STABILIZER, VGGComposite
from lrp_brain.metrics import METRICS
from lrp_brain.outputs import atomic_write_csv, atomic_write_json
from lrp_brain.versions import library_versions

# --- the engine: LRP relevance of a whole ε×γ grid at once (self-contained: nothing below is used here) ------------

#: Bytes the relevance pass of one chunk of settings may use by default (see :class:`SweepEngine`).
MEMORY_BUDGET = 2 * 2 ** 30

#: Copies of the largest activation below the γ/ε boundary that the relevance pass holds per (setting, image) at its
#: peak (measured on VGG16: ~5.2): the incoming relevance, its ratio to the denominators, the transposed
#: convolution's output and the result, and the convolution's working memory.
RELEVANCE_COPIES = 6


class SweepError(ValueError):
    """A model, grid or input the sweep cannot handle; the message names the layer, parameter or value at fault."""


def _stabilize(denominator, shift):
    """Zennit's stabiliser ``z + sign(z)·shift`` with ``sign(0) = +1``; ``shift`` broadcasts against ``z``."""
    shift = torch.as_tensor(shift, dtype=denominator.dtype, device=denominator.device)
    return denominator + torch.where(denominator >= 0, shift, -shift)


def _per_setting(values, ndim):
    """Shape a 1-D tensor of per-setting values ``(S,)`` to broadcast over relevance shaped ``(S, N, ...)``."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def _affine(module, inputs, weight, bias):
    """The Conv2d or Linear ``module`` applied with another ``weight`` and ``bias`` (``None``: no bias)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(inputs, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(inputs, weight, bias)


def _affine_transpose(module, upper, weight, input_shape):
    """``Wᵀ·upper`` for ``upper`` shaped ``(S, N, *output_shape)``: the gradient of the affine map at its input.

    ``weight`` may stack several weights along the input channels (a convolution) or input features (a linear
    layer); the result then stacks their transposes the same way, ``input_shape`` being that of the stack.
    """
    settings, batch = upper.shape[:2]
    flat = upper.reshape(settings * batch, *upper.shape[2:])
    if isinstance(module, nn.Conv2d):
        result = conv2d_input(
            (settings * batch, *input_shape), weight, flat, module.stride, module.padding, module.dilation,
            module.groups,
        )
    else:
        result = flat @ weight
    return result.reshape(settings, batch, *input_shape)


def _rule_parameters(module, zero_bias):
    """Return the weight and the bias a rule sees (``None`` with ``zero_bias`` or without a bias)."""
    bias = None if zero_bias or module.bias is None else module.bias.detach()
    return module.weight.detach(), bias


def _rule_output(module, inputs, outputs, zero_bias):
    """``z = Wx + b`` as a rule sees it: the module's ``outputs``, or ``Wx`` with ``zero_bias``."""
    if zero_bias and module.bias is not None:
        return _affine(module, inputs, module.weight.detach(), None)
    return outputs


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
    """Max-pooling, winner takes all: each output's relevance goes to the input the forward pass picked.

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
        settings, batch, channels = relevance.shape[:3]
        # the indices count the input positions of each (image, channel) row by row, as the flattened input does
        indices = self.indices.reshape(1, batch, channels, -1).expand(settings, -1, -1, -1)
        result = relevance.new_zeros(settings, batch, channels, self.input_shape[1:].numel())
        result.scatter_add_(3, indices, relevance.reshape(settings, batch, channels, -1))
        return result.reshape(settings, batch, *self.input_shape)


class _WeightedStep(_Step):
    """Base of the rules that weight the relevance by the input, ``R_in = x ⊙ (...)``: zero wherever ``x = 0``, so
    zero wherever ``x ≤ 0`` when no input is negative."""
    def forward(self, inputs):
        self.inputs = inputs
        self.nonnegative_input = not bool((inputs < 0).any())
        return super().forward(inputs)

    def input_relevance_vanishes(self, output_relevance_vanishes):
        return self.nonnegative_input


class _NormStep(_WeightedStep):
    """Norm on average pools: ``R_in = x ⊙ Pᵀ(R / stab(z))`` with ``P`` the pooling and ``z = Px``."""
    def _forward(self, inputs):
        outputs = self.module(inputs)
        self.inverse = 1 / _stabilize(outputs, STABILIZER)
        return outputs

    def backward(self, relevance, epsilon):
        settings, batch = relevance.shape[:2]
        upper = (relevance * self.inverse).reshape(settings * batch, *self.output_shape)
        # the pooling is linear, so its transpose is its gradient at any input, here zeros
        with torch.enable_grad():
            probe = upper.new_zeros(settings * batch, *self.input_shape, requires_grad=True)
            transposed, = torch.autograd.grad(self.module(probe), probe, upper)
        return self.inputs * transposed.reshape(settings, batch, *self.input_shape)


class _EpsilonStep(_WeightedStep):
    """LRP-ε: ``R_in = x ⊙ Wᵀ(R / stab_ε(z))``; the swept ε (times the per-image std of ``z`` with ``std_epsilon``),
    or the fixed :data:`STABILIZER` (LRP-0) where ``sweeps_epsilon`` is ``False``."""
    def __init__(self, module, options, sweeps_epsilon):
        super().__init__(module, options)
        self.sweeps_epsilon = sweeps_epsilon

    def _forward(self, inputs):
        outputs = self.module(inputs)
        self.denominator = _rule_output(self.module, inputs, outputs, self.options['zero_bias'])
        if not self.sweeps_epsilon:
            self.inverse = 1 / _stabilize(self.denominator, STABILIZER)
        elif self.options['std_epsilon']:
            # population standard deviation of each image's z over all its entries
            self.std = self.denominator.flatten(1).std(dim=1, correction=0)
        return outputs

    def backward(self, relevance, epsilon):
        if self.sweeps_epsilon:
            shift = _per_setting(epsilon, relevance.ndim)
            if self.options['std_epsilon']:
                shift = shift * _per_setting(self.std, relevance.ndim - 1)
            inverse = 1 / _stabilize(self.denominator, shift)
        else:
            inverse = self.inverse
        upper = relevance * inverse
        # in place on the fresh transposed tensor: a new tensor of this size costs about as much as the product
        return _affine_transpose(self.module, upper, self.module.weight.detach(), self.input_shape).mul_(self.inputs)


class _GammaStep(_WeightedStep):
    """Zennit's generalised LRP-γ.

    With ``x = x⁺ + x⁻`` (positive and negative parts), ``W⁺``, ``W⁻`` likewise and ``z = Wx + b`` the real output,
    the outputs with ``z > 0`` share their relevance by ``(W + γW⁺)x⁺ + (W + γW⁻)x⁻`` and those with ``z < 0`` by
    ``(W + γW⁻)x⁺ + (W + γW⁺)x⁻``:

    ``d± = z + γ·g±`` with ``g⁺ = W⁺x⁺ + W⁻x⁻ + b⁺`` and ``g⁻ = z - g⁺``,
    ``s± = [±z > 0]·R / stab(d±)``,
    ``R_in = x⁺ ⊙ ((W + γW⁺)ᵀs⁺ + (W + γW⁻)ᵀs⁻) + x⁻ ⊙ ((W + γW⁻)ᵀs⁺ + (W + γW⁺)ᵀs⁻)``.

    ``g±`` is γ-independent and computed once per batch. Terms that are zero are skipped: ``x⁻`` for non-negative
    input, ``s⁻`` when the relevance is known to vanish at outputs ``≤ 0`` (a ReLU above), else when it is zero,
    leaving one transposed convolution per batch of settings for a ReLU network.
    """
    def _forward(self, inputs):
        outputs = self.module(inputs)
        weight, bias = _rule_parameters(self.module, self.options['zero_bias'])
        self.positive_inputs = inputs if self.nonnegative_input else inputs.clamp(min=0)
        self.negative_inputs = None if self.nonnegative_input else inputs.clamp(max=0)
        positive_bias = None if bias is None else bias.clamp(min=0)
        positive_part = _affine(self.module, self.positive_inputs, weight.clamp(min=0), positive_bias)
        if self.negative_inputs is not None:
            positive_part = positive_part + _affine(self.module, self.negative_inputs, weight.clamp(max=0), None)
        self.denominator = _rule_output(self.module, inputs, outputs, self.options['zero_bias'])
        # g⁺ where z > 0, g⁻ = z - g⁺ elsewhere: the part of the same sign as z (the sign of the real output decides)
        self.same_sign_part = torch.where(outputs > 0, positive_part, self.denominator - positive_part)
        self.positive_outputs, self.negative_outputs = outputs > 0, outputs < 0
        return outputs

    def set_gamma(self, gamma):
        inverse = 1 / _stabilize(self.denominator + gamma * self.same_sign_part, STABILIZER)
        self.inverse_positive = inverse * self.positive_outputs
        self.inverse_negative = None if self.output_relevance_vanishes else inverse * self.negative_outputs
        weight = self.module.weight.detach()
        self.favour_positive = weight + gamma * weight.clamp(min=0)
        self.favour_negative = weight + gamma * weight.clamp(max=0)

    def backward(self, relevance, epsilon):
        upper_positive = relevance * self.inverse_positive
        upper_negative = None
        if self.inverse_negative is not None:
            upper_negative = relevance * self.inverse_negative
            upper_negative = upper_negative if upper_negative.any() else None
        result = None
        for inputs, same, other in (
            (self.positive_inputs, self.favour_positive, self.favour_negative),
            (self.negative_inputs, self.favour_negative, self.favour_positive),
        ):
            if inputs is None:
                continue
            transposed = _affine_transpose(self.module, upper_positive, same, self.input_shape)
            if upper_negative is not None:
                transposed += _affine_transpose(self.module, upper_negative, other, self.input_shape)
            # in place on fresh tensors, as in _EpsilonStep
            transposed.mul_(inputs)
            result = transposed if result is None else result.add_(transposed)
        return result


class _ZBoxStep(_WeightedStep):
    """z^B for inputs bounded by ``low ≤ x ≤ high``:
    ``R_in = x ⊙ Wᵀs - (l ⊙ W⁺ᵀs + h ⊙ W⁻ᵀs)``, ``s = R / stab((Wx + b) - ((W⁺l + b⁺) + (W⁻h + b⁻)))``."""
    def _forward(self, inputs):
        outputs = self.module(inputs)
        weight, bias = _rule_parameters(self.module, self.options['zero_bias'])
        self.low = expand(self.options['low'], inputs.shape, cut_batch_dim=True).to(inputs)
        self.high = expand(self.options['high'], inputs.shape, cut_batch_dim=True).to(inputs)
        lower = _affine(self.module, self.low, weight.clamp(min=0), None if bias is None else bias.clamp(min=0))
        upper = _affine(self.module, self.high, weight.clamp(max=0), None if bias is None else bias.clamp(max=0))
        denominator = _rule_output(self.module, inputs, outputs, self.options['zero_bias']) - (lower + upper)
        self.inverse = 1 / _stabilize(denominator, STABILIZER)
        return outputs

    def input_relevance_vanishes(self, output_relevance_vanishes):
        return False

    def backward(self, relevance, epsilon):
        weight = self.module.weight.detach()
        channels = self.input_shape[0]
        # Wᵀs, W⁺ᵀs and W⁻ᵀs in one transposed convolution of the weights stacked along the input channels
        stacked = torch.cat([weight, weight.clamp(min=0), weight.clamp(max=0)], dim=1)
        plain, positive, negative = _affine_transpose(
            self.module, relevance * self.inverse, stacked, (3 * channels, *self.input_shape[1:])
        ).split(channels, dim=2)
        return self.inputs * plain - (self.low * positive + self.high * negative)


def _mark_vanishing(steps):
    """Set each step's ``output_relevance_vanishes``, walking down from the output, whose one-hot relevance sits on
    a logit of any sign."""
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
    if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != 'zeros'):
        raise SweepError(
            f'layer {row.name}: padding={module.padding!r}, padding_mode={module.padding_mode!r} is not supported by '
            f'the sweep engine (numeric zero padding only)'
        )
    if row.group == 'first_conv' and module.groups != 1:
        raise SweepError(f'layer {row.name}: a grouped first convolution (groups={module.groups}) is not supported')
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
    gamma, low, high, **options)`` through a Zennit ``Gradient`` attributor with a one-hot output relevance, to
    rounding (see the module's docstring for how). The rule mapping is the composite's own
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
    low, high: float or torch.Tensor
        The z^B bounds of the first convolution, as for the composite.
    epsilon_from_block, epsilon_linears, std_epsilon, zero_bias, allow_negative:
        As for :class:`~lrp_brain.composites.VGGComposite`.
    settings_chunk: int, optional
        How many ε's go through the network as one batch (for one γ below the boundary). By default as many as keep
        the relevance pass under :data:`MEMORY_BUDGET` bytes (all of them for one 224² image), at least one.

    Raises
    ------
    SweepError
        For an invalid grid value or option, a model that is not VGG-like, in training mode, with a layer the rule
        mapping does not cover, or a BatchNorm the canonizers cannot merge.
    """
    def __init__(self, model, epsilons, gammas, low=0., high=1., *, epsilon_from_block=4, epsilon_linears=0,
                 std_epsilon=False, zero_bias=False, allow_negative=False, settings_chunk=None):
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
        self._rule_options = dict(low=low, high=high, std_epsilon=bool(std_epsilon), zero_bias=bool(zero_bias))

    def relevance(self, images, targets):
        """Return the relevance of every setting.

        Parameters
        ----------
        images: torch.Tensor
            ``(N, C, H, W)``, cast to the model's dtype and device.
        targets: torch.Tensor
            ``(N,)`` class indices: the output relevance is one-hot at each target.

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
    def iter_relevance(self, images, targets):
        """Yield the relevance setting by setting, so that only one chunk of settings is held at a time.

        Parameters
        ----------
        images, targets:
            As for :meth:`relevance`.

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
        output_relevance = F.one_hot(targets, outputs.shape[1]).to(outputs)
        # ε = 0 is LRP-0, stabilised as the composite does
        shifts = torch.tensor([value or STABILIZER for value in self.epsilons], dtype=outputs.dtype,
                              device=outputs.device)
        chunk = self._chunk_size(steps[:self._boundary], batch, outputs.element_size())
        chunks = [range(start, min(start + chunk, len(self.epsilons))) for start in range(0, len(self.epsilons), chunk)]
        below, above = steps[:self._boundary], steps[self._boundary:]
        boundary_relevance = torch.cat([
            _propagate(above, output_relevance.expand(len(part), *output_relevance.shape), shifts[part.start:part.stop])
            for part in chunks
        ])
        for gamma_index, gamma in enumerate(self.gammas):
            for step in below:
                step.set_gamma(gamma)
            for part in chunks:
                relevance = _propagate(below, boundary_relevance[part.start:part.stop], None)
                for offset, eps_index in enumerate(part):
                    yield eps_index, gamma_index, relevance[offset]

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


def _propagate(steps, relevance, epsilon):
    """Take ``relevance`` ``(S, N, ...)`` at the output of ``steps`` down to their input, reshaping between steps."""
    settings, batch = relevance.shape[:2]
    for step in reversed(steps):
        relevance = step.backward(relevance.reshape(settings, batch, *step.output_shape), epsilon)
    return relevance


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


@dataclass
class SweepResult:
    """What :func:`run_sweep` found.

    Attributes
    ----------
    table: list of dict
        One row per (ε, γ, quantile): the setting, and per split the mean IoU with its 95 % bootstrap interval,
        the number of images it averages and the means of the other metrics.
    best: dict
        The row of the setting with the highest mean validation IoU.
    choice: dict
        What ``choice.json`` holds: the best setting, which split chose it and which reports it, the grid, the data
        and model fingerprints.
    """
    table: list
    best: dict
    choice: dict


def _setting_key(epsilon, gamma, quantile):
    return f'eps={epsilon:g},gamma={gamma:g},q={quantile:g}'


def _score_part(source, part, engine, quantiles, *, batch_size, device, out, identity, progress,
                composite_kwargs=None):
    """Score every setting on every image of one split part; return one row per image, in split order, holding
    ``{setting key: {metric: value}}`` under ``'scores'``."""
    from lrp_brain import metrics
    from lrp_brain.data import relative_ref

    dataset = source.dataset(part)
    keys = [relative_ref(ref, source.split.root) for ref in dataset.refs]

    def compute(indices):
        items = [dataset[index] for index in indices]
        images = torch.stack([item['image'] for item in items]).to(device)
        masks = torch.stack([item['mask'] for item in items])
        labels = torch.tensor([item['label'] for item in items])
        scores = [{} for _ in items]
        for eps_index, gamma_index, relevance in engine.iter_relevance(images, labels.to(device)):
            epsilon, gamma = engine.epsilons[eps_index], engine.gammas[gamma_index]
            for quantile in quantiles:
                try:
                    values = metrics.evaluate_maps(relevance.cpu(), masks, quantile,
                                                   names=[keys[i] for i in indices])
                except metrics.MetricError as error:  # NaN relevance, named by image: add the setting
                    raise SweepError(
                        f'{error} with epsilon={epsilon:g}, gamma={gamma:g}'
                        + (f' and {composite_kwargs}' if composite_kwargs else '')
                        + ('; std_epsilon=True gives 0 / 0 where a layer output is constant (e.g. an all-zero image)'
                           if (composite_kwargs or {}).get('std_epsilon') else '')
                    ) from error
                key = _setting_key(epsilon, gamma, quantile)
                for position, score in enumerate(scores):
                    score[key] = {name: float(values[name][position]) for name in METRICS}
        return [{'file': keys[index], 'label': item['label'], 'scores': score}
                for index, item, score in zip(indices, items, scores)]

    settings = len(engine.epsilons) * len(engine.gammas) * len(quantiles)
    return distributed.batch_rows(
        keys, batch_size, compute, identity={**identity, 'part': part}, progress=progress,
        log_path=None if out is None else os.path.join(out, f'{part}.rows.jsonl'),
        description=f'sweep {part} ({settings} settings)',
    )


def _summaries(rows, settings, class_names):
    """Per setting and metric, the summary of :func:`lrp_brain.metrics.summarize` over the rows of one part."""
    from lrp_brain import metrics

    labels = torch.tensor([row['label'] for row in rows], dtype=torch.long)
    return {
        key: {
            name: metrics.summarize(torch.tensor([row['scores'][key][name] for row in rows], dtype=torch.float64),
                                    labels, class_names)
            for name in METRICS
        } for key in settings
    }


def run_sweep(source, epsilons, gammas, quantiles=(0.9,), *, out=None, batch_size=4, device='cpu', progress=True,
              allow_negative=False, notes=None, composite_kwargs=None):
    """Score every (ε, γ, quantile) on the validation split, choose the best by mean IoU there, report on test.

    The relevance comes from :class:`SweepEngine` (the same numbers as :class:`~lrp_brain.composites.VGGComposite`,
    computed for the whole grid at once) for the images' true classes, as in the study. Selection uses the
    validation split only; the test split is scored for every setting so the table shows it, but it never decides.

    Parameters
    ----------
    source: lrp_brain.sources.Source
        Model and data (see :func:`lrp_brain.sources.open_source`).
    epsilons, gammas: sequence of float
        The grid.
    quantiles: sequence of float
        Thresholds of the relevance mask to sweep as well (0.9: the top 10 %).
    out: str, optional
        Folder for ``sweep.csv``, ``heatmap.png``, ``choice.json`` and the row logs an interrupted sweep resumes
        from; nothing is written if ``None``.
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

    Returns
    -------
    SweepResult
    """
    quantiles = tuple(float(value) for value in quantiles)
    if not quantiles or any(not 0 <= value <= 1 for value in quantiles):
        raise SweepError(f'quantiles must lie in [0, 1], got {quantiles}')
    low, high = source.bounds
    model = source.model.to(device).eval()
    engine = SweepEngine(model, epsilons, gammas, _to(low, device), _to(high, device),
                         allow_negative=allow_negative, **(composite_kwargs or {}))
    settings = [_setting_key(epsilon, gamma, quantile) for epsilon in engine.epsilons for gamma in engine.gammas
                for quantile in quantiles]
    grid = {'epsilons': list(engine.epsilons), 'gammas': list(engine.gammas), 'quantiles': list(quantiles),
            'composite_kwargs': composite_kwargs or {}, **source.bounds_record(),
            'input_size': source.transform.size, 'target': 'label'}
    identity = {'grid': grid, 'model': source.model_id, 'batch_size': batch_size}
    summaries = {}
    for part in (SELECT_ON, REPORT_ON):
        if not getattr(source.split, part):
            raise SweepError(f'the {part} split of {source.data} is empty; the sweep needs images to choose on '
                             f'({SELECT_ON}) and to report on ({REPORT_ON}): use more data or another split')
        rows = _score_part(source, part, engine, quantiles, batch_size=batch_size, device=device, out=out,
                           identity={**identity, 'data': source.data_id(part)}, progress=progress,
                           composite_kwargs=composite_kwargs)
        summaries[part] = _summaries(rows, settings, source.class_names)

    table = []
    for epsilon in engine.epsilons:
        for gamma in engine.gammas:
            for quantile in quantiles:
                key = _setting_key(epsilon, gamma, quantile)
                row = {'epsilon': epsilon, 'gamma': gamma, 'quantile': quantile}
                for part in (SELECT_ON, REPORT_ON):
                    iou = summaries[part][key]['iou']['overall']
                    row.update({f'{part}_iou': iou['mean'], f'{part}_iou_ci_low': iou['ci_low'],
                                f'{part}_iou_ci_high': iou['ci_high'], f'{part}_n': iou['n'],
                                f'{part}_excluded': iou['excluded']})
                    row.update({f'{part}_{name}': summaries[part][key][name]['overall']['mean']
                                for name in METRICS if name != 'iou'})
                table.append(row)

    def best_by(part):
        finite = [row for row in table if row[f'{part}_iou'] == row[f'{part}_iou']]
        if not finite:
            raise SweepError(f'no setting has a defined mean IoU on the {part} split (every image excluded)')
        return max(finite, key=lambda row: row[f'{part}_iou'])  # the first of equal rows, in grid order

    best = best_by(SELECT_ON)
    best_key = _setting_key(best['epsilon'], best['gamma'], best['quantile'])
    choice = {
        'best': {'epsilon': best['epsilon'], 'gamma': best['gamma'], 'quantile': best['quantile']},
        'selected_on': SELECT_ON,
        'reported_on': REPORT_ON,
        'validation': {'iou': summaries[SELECT_ON][best_key]['iou']},
        'test': {name: summaries[REPORT_ON][best_key][name] for name in METRICS},
        'grid': grid,
        'split': {'method': source.split.method, 'seed': source.split.seed,
                  'sizes': {part: len(getattr(source.split, part)) for part in ('train', 'val', 'test')}},
        'model': source.model_id,
        'data': {'source': source.data, **{part: source.data_id(part) for part in (SELECT_ON, REPORT_ON)}},
        'versions': library_versions(),
        'processes': distributed.world_size(),
    }
    if notes:
        study = best_by(REPORT_ON)
        choice['notes'] = notes
        choice['study_choice'] = {'epsilon': study['epsilon'], 'gamma': study['gamma'],
                                  'quantile': study['quantile'], 'test_iou': study[f'{REPORT_ON}_iou'],
                                  'why_not_used': 'chosen on the test split, as the seed study did: optimistic'}
    if out is not None:
        distributed.on_main(lambda: _write_outputs(out, table, choice, engine, quantiles, best))
    return SweepResult(table, best, choice)


def _write_outputs(out, table, choice, engine, quantiles, best):
    """Write ``sweep.csv``, ``choice.json`` and one heatmap of the mean validation IoU per quantile."""
    from lrp_brain.figures import sweep_heatmap

    atomic_write_csv(os.path.join(out, 'sweep.csv'), table)
    atomic_write_json(os.path.join(out, 'choice.json'), choice)
    for quantile in quantiles:
        mean_iou = [[next(row[f'{SELECT_ON}_iou'] for row in table if row['epsilon'] == epsilon
                          and row['gamma'] == gamma and row['quantile'] == quantile)
                     for gamma in engine.gammas] for epsilon in engine.epsilons]
        name = 'heatmap.png' if quantile == best['quantile'] else f'heatmap_q{quantile:g}.png'
        cell = (engine.epsilons.index(best['epsilon']), engine.gammas.index(best['gamma'])) \
            if quantile == best['quantile'] else None
        sweep_heatmap(os.path.join(out, name), engine.epsilons, engine.gammas, mean_iou, best=cell,
                      title=f'mean validation IoU (quantile {quantile:g})')


def _to(bound, device):
    return bound.to(device) if isinstance(bound, torch.Tensor) else bound
