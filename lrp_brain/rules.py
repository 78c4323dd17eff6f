"""The LRP rules of the project, written once: LRP-ε, LRP-γ and z^B (and, for the sweep engine, Norm and
winner-takes-all), as functions used by two callers.

- The Zennit hooks at the end of this module (:class:`Epsilon`, :class:`Gamma`, :class:`ZBox`) apply a rule to one
  layer for one setting. Each equals Zennit's rule of the same name (:class:`zennit.rules.Epsilon`,
  :class:`zennit.rules.Gamma`, :class:`zennit.rules.ZBox`) to rounding and is used the same way: in any Zennit
  composite, on any ``Linear``, ``Conv1d``/``2d``/``3d`` or ``ConvTranspose1d``/``2d``/``3d`` layer with zero
  padding, copied per layer by the composite, removed with it, switched off by
  :meth:`zennit.core.Composite.inactive`.
- The sweep engine (:mod:`lrp_brain.sweep_engine`) applies them without hooks to many settings at once: the
  relevance may have leading *settings* dimensions in front of the batch, ``(S, N, ...)`` for an input ``(N, ...)``,
  and every function below broadcasts the layer's forward quantities over them.

For a layer with input ``x``, output ``z = Wx + b``, upper relevance ``g`` (Zennit sends relevance through the
gradient) and ``Wᵀ`` the layer's input gradient (a transposed convolution or a matrix product), the rules are:

- LRP-ε (:func:`epsilon_relevance`): ``R = x ⊙ Wᵀ (g / s(z))`` with the stabiliser ``s`` (:func:`stabilize`).
- LRP-γ (:func:`gamma_relevance`), Zennit's generalised form, see there.
- z^B (:func:`zbox_relevance`) for inputs in a box ``l ≤ x ≤ h``, see there.

The hooks are fast because they do less than Zennit's. Zennit's rules let the layer's own backward run, throw its
result away and recompute the relevance from several modified forward passes (Gamma five, ZBox three). Here a forward
hook passes the layer's output on through one custom autograd node whose backward returns the relevance of the layer
input directly; the layer's own backward never runs. LRP-ε needs no modified forward, LRP-γ behind a ReLU one, z^B's
two bound terms are one layer call on channel-stacked inputs and its three transposed passes one call with stacked
weights. Modified weights are computed once per forward call, elementwise steps run in place on tensors the rule owns,
and only what the backward needs is kept. The hooked layers' parameters get no gradient: their autograd node is cut
out.
"""
import torch
from torch import nn
from zennit.core import Hook, RemovableHandle, RemovableHandleList, expand


class RuleError(ValueError):
    """A rule was given a module it cannot handle."""


# --- stabilising denominators -----------------------------------------------------------------------------------


class StdStabilizer:
    """Stabilise a denominator ``z`` by ε times its standard deviation: ``z + sign(z)·ε·std(z)``.

    The standard deviation is the population one (``correction=0``) over all but the batch dimension, so every
    sample gets its own ε; ``sign(0) = +1`` as in Zennit. ``epsilon`` may be a tensor of one ε per setting shaped
    ``(S, 1, ..., 1)`` (one more dimension than ``z``): the result is then ``(S, *z.shape)``.
    """
    def __init__(self, epsilon):
        self.epsilon = epsilon

    def __call__(self, output):
        dims = tuple(range(1, output.ndim))
        scale = output.std(dim=dims, keepdim=True, correction=0)
        sign = (output >= 0).to(output) * 2 - 1
        return output + sign * self.epsilon * scale


def stabilize(value, stabilizer):
    """Return ``value`` moved away from zero as Zennit's rules do, as a new tensor.

    Parameters
    ----------
    value: torch.Tensor
        The denominator; left unchanged.
    stabilizer: float, torch.Tensor or callable
        A number ``ε`` gives ``value + sign(value)·ε`` with ``sign(0) = +1``; a tensor of ε's (one per setting,
        shaped ``(S, 1, ..., 1)``) gives one such denominator per setting, ``(S, *value.shape)``; a callable (e.g.
        :class:`StdStabilizer`) is applied to ``value`` and must not change it.
    """
    if callable(stabilizer):
        return stabilizer(value)
    return _signed_shift(value, stabilizer).add_(value)


def _signed_shift(value, epsilon):
    """Return ``sign(value)·ε`` with ``sign(0) = +1``, in one pass for ``ε ≥ 0``.

    ``copysign`` reads the sign bit, so ``-0.0`` gets ``-ε`` where Zennit gives ``+ε``; sums of products, what a
    layer returns, are ``+0.0`` when they are zero.
    """
    if not torch.is_tensor(epsilon):
        shift = torch.copysign(torch.tensor(abs(float(epsilon)), dtype=value.dtype), value)
        return shift if epsilon >= 0 else shift.neg_()
    epsilon = epsilon.to(value)
    shift = torch.copysign(epsilon.abs(), value)
    return shift if bool((epsilon >= 0).all()) else shift.mul_(epsilon.sign())


def per_setting(values, ndim):
    """Shape ``(S,)`` values (one per setting) to broadcast as the leading dimension against ``ndim``-dimensional
    per-sample tensors, giving ``(S, *shape)``."""
    return values.reshape(-1, *([1] * ndim))


# --- the layers the rules serve: forward with other parameters, and the transposed pass ----------------------------

#: The layers the fast rules handle: every linear layer type Zennit's rules serve.
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _padding(module):
    """Return the explicit zero padding of a convolution (``'valid'`` and symmetric ``'same'`` resolved)."""
    if not isinstance(module.padding, str):
        return module.padding
    if module.padding == 'valid':
        return (0,) * len(module.kernel_size)
    totals = [dilation * (size - 1) for dilation, size in zip(module.dilation, module.kernel_size)]
    if any(total % 2 for total in totals):
        raise RuleError(
            f"{module}: padding='same' with an even kernel pads asymmetrically; give the padding as numbers"
        )
    return tuple(total // 2 for total in totals)


def check_module(module):
    """Raise :class:`RuleError` unless the fast rules can handle ``module``: a ``Linear``, or a convolution of
    :data:`LAYERS` with zero padding."""
    if not isinstance(module, LAYERS):
        raise RuleError(
            f'lrp_brain.rules handle {", ".join(layer.__name__ for layer in LAYERS)} layers, not '
            f'{type(module).__name__} ({module}); use a Zennit rule for it'
        )
    if isinstance(module, nn.Linear):
        return
    if module.padding_mode != 'zeros':
        raise RuleError(f"{module}: padding_mode={module.padding_mode!r} is not supported, only 'zeros'")
    _padding(module)


def _stack(tensors, groups, dim):
    """Concatenate ``tensors`` along the (input) feature dimension ``dim`` as a stacked layer expects them.

    With ``groups > 1`` the features along ``dim`` are seen in groups, so the tensors are interleaved group by
    group (inputs of grouped convolutions, weights of grouped transposed convolutions).
    """
    if len(tensors) == 1:
        return tensors[0]
    if groups == 1:
        return torch.cat(tensors, dim)
    return torch.cat([tensor.unflatten(dim, (groups, -1)) for tensor in tensors], dim + 1).flatten(dim, dim + 1)


def _stack_weights(module, weights):
    """Stack ``weights`` along the input features of ``module.weight``: dimension 1 (it holds one group's channels),
    or 0 for a transposed convolution (the channels of all groups)."""
    if getattr(module, 'transposed', False):
        return _stack(weights, module.groups, 0)
    return _stack(weights, 1, 1)


def _convolution_arguments(module):
    return (module.stride, _padding(module), module.dilation, module.transposed, module.output_padding,
            module.groups)


def layer_forward(module, inputs, weights, bias):
    """Return ``Σ_k layer(inputs[k]; weights[k]) + bias`` for the layer ``module`` (one of :data:`LAYERS`).

    Several terms are computed as one layer call on the stacked inputs and weights.
    """
    weight = _stack_weights(module, weights)
    if isinstance(module, nn.Linear):
        return torch.nn.functional.linear(_stack(inputs, 1, -1), weight, bias)
    input = _stack(inputs, module.groups, 1)
    return torch.ops.aten.convolution(input, weight, bias, *_convolution_arguments(module))


def layer_backward(module, input, weights, grad_output):
    """Return ``[weight_kᵀ grad_output for each of weights]``: the input gradients of ``layer(input; weight_k)``.

    ``grad_output`` may have leading settings dimensions in front of the batch, ``(S, N, ...)`` for ``input`` shaped
    ``(N, ...)``; the results have them too. Several weights are handled by one transposed call with the weights
    stacked along the input features.
    """
    weight = _stack_weights(module, weights)
    count = len(weights)
    if isinstance(module, nn.Linear):
        stacked = grad_output.matmul(weight)
        feature_dim, groups = stacked.ndim - 1, 1
    else:
        feature_dim, groups = grad_output.ndim - input.ndim + 1, module.groups
        flat = grad_output.flatten(0, feature_dim - 1) if feature_dim > 1 else grad_output
        # the input only gives the shape; a stacked one, or one with the settings in the batch, is a stand-in
        shaped_input = input if count == 1 and feature_dim == 1 else input.new_empty(()).expand(
            flat.shape[:1] + (input.shape[1] * count,) + input.shape[2:]
        )
        stacked = torch.ops.aten.convolution_backward(
            flat, shaped_input, weight, None, *_convolution_arguments(module), (True, False, False),
        )[0]
        if feature_dim > 1:
            stacked = stacked.unflatten(0, grad_output.shape[:feature_dim])
    if count == 1:
        return [stacked]
    grouped = stacked.unflatten(feature_dim, (groups, count, -1))
    return [grouped.select(feature_dim + 1, index).flatten(feature_dim, feature_dim + 1) for index in range(count)]


def rule_parameters(module, zero_params):
    """Return ``(weight, bias)`` of ``module`` as a rule sees them: each replaced by zeros if named in
    ``zero_params`` (a name or a list of names, as in Zennit; ``'bias'`` for the zero-bias variants)."""
    names = () if zero_params is None else (zero_params,) if isinstance(zero_params, str) else tuple(zero_params)
    weight = torch.zeros_like(module.weight) if 'weight' in names else module.weight
    bias = module.bias
    if bias is not None and 'bias' in names:
        bias = torch.zeros_like(bias)
    return weight, bias


def rule_output(module, input, output, weight, bias):
    """``z = Wx + b`` as a rule with the parameters ``weight``, ``bias`` (of :func:`rule_parameters`) sees it: the
    layer's ``output`` itself unless a parameter was zeroed, which costs one forward of the layer."""
    if weight is module.weight and bias is module.bias:
        return output
    return layer_forward(module, (input,), (weight,), bias)


# --- LRP-ε -------------------------------------------------------------------------------------------------------


def epsilon_relevance(module, input, grad_output, weight, denominator):
    """LRP-ε, equal to :class:`zennit.rules.Epsilon`: ``R = x ⊙ Wᵀ (g / s(z))``.

    Parameters
    ----------
    module: torch.nn.Module
        The layer, one of :data:`LAYERS`.
    input: torch.Tensor
        Its input ``x``, ``(N, ...)``.
    grad_output: torch.Tensor
        The upper relevance ``g``, ``(N, ...)`` or ``(S, N, ...)`` for ``S`` settings.
    weight: torch.Tensor
        ``W`` (of :func:`rule_parameters`).
    denominator: torch.Tensor
        ``s(z)``: ``stabilize(rule_output(...), ε)``, one per setting or one for all; a tiny ``ε`` gives LRP-0.
    """
    gradient, = layer_backward(module, input, (weight,), grad_output / denominator)
    return gradient.mul_(input)


# --- LRP-γ -------------------------------------------------------------------------------------------------------


def gamma_parameters(weight, bias, gamma, sign):
    """Return ``(W + γ·part(W), b + γ·part(b))``, ``part`` the positive (``sign > 0``) or negative part; ``bias``
    may be ``None``."""
    def modify(parameter):
        part = parameter.clamp(min=0) if sign > 0 else parameter.clamp(max=0)
        return part.mul_(gamma).add_(parameter)

    return modify(weight), None if bias is None else modify(bias)


def gamma_denominator(module, inputs, weights, bias, output, stabilizer, sign):
    """Return the LRP-γ denominator of the outputs of sign ``sign``, masked: ``s(Σ_k layer(inputs[k]; weights[k]) +
    bias) / [sign·z > 0]``, and the mask's memory (a tensor shaped like ``output`` the caller may reuse).

    This is the form for one γ, ``z^± = W^±_γ x⁺ + W^∓_γ x⁻ + b^±_γ`` with the modified parameters of
    :func:`gamma_parameters`, the terms added one by one as Zennit does (near-zero denominators amplify a change of
    rounding). Dividing by the mask puts ``±inf`` where the output does not have the sign, so ``g / denominator`` is
    the masked, normalised relevance in one step.
    """
    total = layer_forward(module, inputs[:1], weights[:1], bias)
    for input, weight in zip(inputs[1:], weights[1:]):
        total += layer_forward(module, (input,), (weight,), None)
    return gamma_masked_denominator(total, output, stabilizer, sign)


def gamma_shared_part(module, input, input_parts, output, weight, bias):
    """Return the γ-independent part ``P`` of the LRP-γ denominators, for many γ: ``z^±(γ) = z + γ·P``.

    ``P = W⁺x⁺ + W⁻x⁻ + b⁺`` where ``z > 0`` and ``P = z − (W⁺x⁺ + W⁻x⁻ + b⁺) = W⁻x⁺ + W⁺x⁻ + b⁻`` elsewhere (the sign
    of the real output picks the term), with ``z`` the :func:`rule_output` and ``input_parts = (x⁺, x⁻)`` (``x⁻``
    ``None`` for ``x ≥ 0``). ``z + γ·P`` then equals the denominator sum of :func:`gamma_denominator` to rounding.
    """
    inputs = tuple(part for part in input_parts if part is not None)
    weights = (weight.clamp(min=0), weight.clamp(max=0))[:len(inputs)]
    positive_part = layer_forward(module, inputs, weights, None if bias is None else bias.clamp(min=0))
    rule_z = rule_output(module, input, output, weight, bias)
    return rule_z, torch.where(output > 0, positive_part, rule_z - positive_part)


def gamma_masked_denominator(total, output, stabilizer, sign):
    """Return ``s(total) / [sign·output > 0]`` (``total``, shaped like ``output``, is consumed for a number
    ``stabilizer``) and the mask's memory."""
    compare = torch.gt if sign > 0 else torch.lt
    if callable(stabilizer):
        denominator, scratch = stabilizer(total), torch.empty_like(total)
    else:
        scratch = _signed_shift(total, stabilizer)
        denominator = total.add_(scratch)
    return denominator.div_(compare(output, 0, out=scratch)), scratch


def reaches_masked(grad_output, masked_denominator, workspace=None):
    """Whether ``grad_output`` is non-zero anywhere ``masked_denominator`` masks out (is ``±inf``).

    ``g · denominator`` is ``±inf`` where ``g ≠ 0`` is masked out, NaN where ``g = 0`` is, finite elsewhere: one
    product and one reduction tell.
    """
    product = torch.mul(grad_output, masked_denominator, out=workspace)
    return not torch.isfinite(torch.nansum(product))


def gamma_relevance(module, input_parts, grad_output, weights, denominators, workspace=None):
    """LRP-γ in Zennit's generalised form, equal to :class:`zennit.rules.Gamma`.

    With ``W⁺_γ = W + γ·max(W, 0)``, ``W⁻_γ = W + γ·min(W, 0)`` (the bias likewise, :func:`gamma_parameters`) and
    ``x = x⁺ + x⁻`` split by sign, the positive outputs (``z > 0``) are explained by ``z⁺ = W⁺_γx⁺ + W⁻_γx⁻ + b⁺_γ``
    and the negative ones by ``z⁻ = W⁻_γx⁺ + W⁺_γx⁻ + b⁻_γ``:

    ``R = x⁺ ⊙ (W⁺_γᵀ g⁺ + W⁻_γᵀ g⁻) + x⁻ ⊙ (W⁻_γᵀ g⁺ + W⁺_γᵀ g⁻)`` with ``g^± = [±z > 0] g / s(z^±)``.

    For ``x ≥ 0`` the ``x⁻`` terms vanish, leaving ``R = x ⊙ (W⁺_γᵀ g⁺ + W⁻_γᵀ g⁻)``, and ``g⁻`` is zero unless the
    upper relevance has non-zeros where ``z ≤ 0`` (never behind a ReLU or max-pool, which pass relevance only where
    the output is positive; :func:`reaches_masked` tells). Then the rule costs one transposed pass.

    Parameters
    ----------
    module: torch.nn.Module
        The layer, one of :data:`LAYERS`.
    input_parts: tuple of torch.Tensor
        ``(x⁺, x⁻)``; ``x⁻`` is ``None`` for ``x ≥ 0`` (its terms are skipped).
    grad_output: torch.Tensor
        The upper relevance ``g``, ``(N, ...)`` or ``(S, N, ...)``.
    weights: tuple of torch.Tensor
        ``(W⁺_γ, W⁻_γ)``; ``W⁻_γ`` may be ``None`` when neither ``x⁻`` nor ``g⁻`` has terms.
    denominators: tuple of torch.Tensor
        The masked denominators ``(s(z⁺)/[z > 0], s(z⁻)/[z < 0])`` (:func:`gamma_denominator`); the second ``None``
        skips the ``g⁻`` terms.
    workspace: torch.Tensor, optional
        A tensor shaped like ``grad_output`` that may be overwritten (saves an allocation).
    """
    positive_input, negative_input = input_parts
    favour_positive, favour_negative = weights
    relevance = None
    for denominator, same, other in ((denominators[0], favour_positive, favour_negative),
                                     (denominators[1], favour_negative, favour_positive)):
        if denominator is None:
            continue
        scaled = torch.div(grad_output, denominator, out=workspace)
        workspace = None
        if negative_input is None:
            term, = layer_backward(module, positive_input, (same,), scaled)
            relevance = term if relevance is None else relevance.add_(term)
        else:
            term = layer_backward(module, positive_input, (same, other), scaled)
            relevance = term if relevance is None else [total.add_(part) for total, part in zip(relevance, term)]
    if negative_input is None:
        return relevance.mul_(positive_input)
    return relevance[0].mul_(positive_input).addcmul_(relevance[1], negative_input)


# --- z^B -------------------------------------------------------------------------------------------------------------


def input_bounds(module, input, low, high):
    """Return the z^B bounds ``(l, h)`` as tensors broadcastable to ``input``.

    ``low``/``high`` given (a number or a tensor broadcastable to the input, e.g. ``(1, C, 1, 1)``) are expanded to
    the input's shape. ``None`` takes the bound from each input sample: per sample and per channel (dimension 1), its
    minimum (``low``) or maximum (``high``) over the remaining dimensions; for a ``Linear`` layer per sample over all
    its features. Both are expanded views of the input's shape. Such a box always contains the input and does not depend
    on the other samples of the batch.
    """
    reduce = tuple(range(1 if isinstance(module, nn.Linear) else 2, input.ndim))

    def bound(value, extreme):
        if value is None:
            return extreme(input.detach(), dim=reduce, keepdim=True).expand_as(input) if reduce else input.detach()
        return expand(value, input.shape, cut_batch_dim=True).to(input)

    return bound(low, torch.amin), bound(high, torch.amax)


def zbox_prepare(module, input, output, low, high, weight, bias, stabilizer):
    """Return the forward quantities of z^B: ``((W, W⁺, W⁻), s(z − (W⁺l + b⁺ + W⁻h + b⁻)))`` and a tensor shaped like
    ``output`` that the backward may overwrite.

    ``low``, ``high`` are the bounds of :func:`input_bounds`; ``z`` is the :func:`rule_output`. The two bound terms
    are one layer call on the stacked bounds (the bias parts ``max(b, 0) + min(b, 0)`` add up to ``b`` exactly).
    """
    output = rule_output(module, input, output, weight, bias)
    positive_weight, negative_weight = weight.clamp(min=0), weight.clamp(max=0)
    bounds = layer_forward(module, (low, high), (positive_weight, negative_weight), bias)
    denominator = stabilize(torch.sub(output, bounds, out=bounds), stabilizer)
    return (weight, positive_weight, negative_weight), denominator, bounds


def zbox_relevance(module, input, grad_output, weights, low, high, denominator, workspace=None):
    """The z^B rule for inputs bounded by ``l ≤ x ≤ h``, equal to :class:`zennit.rules.ZBox`.

    ``R = x ⊙ Wᵀ g' − (l ⊙ W⁺ᵀ g' + h ⊙ W⁻ᵀ g')`` with ``g' = g / s(Wx + b − (W⁺l + b⁺ + W⁻h + b⁻))``, where
    ``W⁺ = max(W, 0)`` and ``W⁻ = min(W, 0)`` (the bias likewise).

    Parameters
    ----------
    module: torch.nn.Module
        The layer, one of :data:`LAYERS`.
    input: torch.Tensor
        ``x``, ``(N, ...)``.
    grad_output: torch.Tensor
        The upper relevance ``g``, ``(N, ...)`` or ``(S, N, ...)``.
    weights, denominator:
        From :func:`zbox_prepare`.
    low, high: torch.Tensor
        The bounds of :func:`input_bounds`.
    workspace: torch.Tensor, optional
        A tensor shaped like ``grad_output`` that may be overwritten.
    """
    from_input, from_low, from_high = layer_backward(
        module, input, weights, torch.div(grad_output, denominator, out=workspace),
    )
    bounds = from_low.mul_(low).addcmul_(from_high, high)
    return from_input.mul_(input).sub_(bounds)


# --- pools (the sweep engine; the composite uses Zennit's Norm and the gradient) ------------------------------------


def norm_relevance(module, input, grad_output, denominator):
    """Norm on a linear pool ``P`` (average pools): ``R = x ⊙ Pᵀ (g / s(z))`` with ``z = Px`` and ``denominator =
    s(z)``, equal to :class:`zennit.rules.Norm`; ``grad_output`` may have leading settings dimensions."""
    upper = grad_output / denominator
    flat = upper.reshape(-1, *upper.shape[upper.ndim - input.ndim + 1:])
    # the pooling is linear, so its transpose is its gradient at any input, here zeros
    with torch.enable_grad():
        probe = flat.new_zeros(flat.shape[:1] + input.shape[1:], requires_grad=True)
        transposed, = torch.autograd.grad(module(probe), probe, flat)
    return transposed.reshape(upper.shape[:upper.ndim - input.ndim + 1] + input.shape[1:]).mul_(input)


def winner_takes_all(indices, grad_output, input_shape):
    """Max-pooling: each output's relevance goes to the input the forward pass picked (``indices`` as
    ``return_indices=True`` gives them, counting the positions of each (sample, channel) row by row); ``grad_output``
    may have leading settings dimensions, ``input_shape`` is ``(N, C, ...)``."""
    lead = grad_output.shape[:grad_output.ndim - len(input_shape)]
    rows = grad_output.reshape(*lead, *input_shape[:2], -1)
    result = rows.new_zeros(*lead, *input_shape[:2], input_shape[2:].numel())
    result.scatter_add_(-1, indices.reshape(*input_shape[:2], -1).expand_as(rows), rows)
    return result.reshape(*lead, *input_shape)


# --- the Zennit hooks --------------------------------------------------------------------------------------------


class _RuleNode(torch.autograd.Function):
    """Stand-in for a hooked layer's autograd node: passes the output on, returns the rule's relevance backwards."""
    @staticmethod
    def forward(ctx, rule, module, input, output):
        saved, workspace = rule.prepare(module, input, output)
        ctx.save_for_backward(input, *saved)
        # the workspace is scratch memory for the backward, overwritten there: no saved-tensor version check
        ctx.rule, ctx.module, ctx.workspace = rule, module, workspace
        # a new tensor object, not ``output`` itself: in-place operations after the layer stay allowed
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        input, *saved = ctx.saved_tensors
        if ctx.rule.active:
            relevance = ctx.rule.relevance(ctx.module, input, grad_output, ctx.workspace, *saved)
        else:
            relevance, = layer_backward(ctx.module, input, (ctx.module.weight,), grad_output)
        return None, None, relevance, None


class FastRule(Hook):
    """Base of the fast rules: a Zennit hook that replaces its layer's autograd node by one that returns relevance.

    Subclasses implement :meth:`prepare` (in the forward pass: the tensors the backward needs), :meth:`relevance`
    (the backward) and :meth:`copy`, each by calling the rule's functions above. A large allocation costs more than
    a pass over its memory (fresh pages are zeroed by the kernel), so a tensor the forward needed only for a while is
    handed on as the backward's workspace instead of being allocated again there.

    Parameters
    ----------
    zero_params: str or list of str, optional
        Names of parameters the rule treats as zero (``'bias'`` for the zero-bias variants), as in Zennit.
    """
    def __init__(self, zero_params=None):
        super().__init__()
        self.zero_params = zero_params

    def register(self, module):
        """Register the rule's forward hook to ``module``; return a handle list whose ``remove()`` undoes it.

        Raises
        ------
        RuleError
            If ``module`` is not one of :data:`LAYERS` with zero padding.
        """
        check_module(module)
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self.forward)])

    def forward(self, module, input, output):
        """Forward hook: route the output through the rule's autograd node when a gradient will reach the input."""
        if not (torch.is_grad_enabled() and input[0].requires_grad):
            return None
        return _RuleNode.apply(self, module, input[0], output.detach())

    def prepare(self, module, input, output):
        """Return ``(saved, workspace)``: the tensors the backward needs, and a tensor shaped like ``output`` it may
        overwrite (or ``None``). Runs in the forward pass, without autograd."""
        raise NotImplementedError

    def relevance(self, module, input, grad_output, workspace, *saved):
        """Return the relevance of ``input`` from the upper relevance ``grad_output`` and :meth:`prepare`'s
        tensors."""
        raise NotImplementedError


class Epsilon(FastRule):
    """LRP-ε (:func:`epsilon_relevance`) as a Zennit hook, equal to :class:`zennit.rules.Epsilon`.

    Parameters
    ----------
    epsilon: float or callable
        A number ``ε`` stabilises ``z`` to ``z + sign(z)·ε`` (a tiny ``ε`` gives LRP-0); a callable ``(z) ->
        stabilised z`` such as :class:`StdStabilizer` is applied instead.
    zero_params: str or list of str, optional
        See :class:`FastRule`; ``'bias'`` makes the denominator ``Wx``, which costs one forward of the layer.
    """
    def __init__(self, epsilon=1e-6, zero_params=None):
        super().__init__(zero_params)
        self.epsilon = epsilon

    def copy(self):
        return Epsilon(self.epsilon, self.zero_params)

    def prepare(self, module, input, output):
        weight, bias = rule_parameters(module, self.zero_params)
        return (weight, stabilize(rule_output(module, input, output, weight, bias), self.epsilon)), None

    def relevance(self, module, input, grad_output, workspace, weight, denominator):
        return epsilon_relevance(module, input, grad_output, weight, denominator)


class Gamma(FastRule):
    """LRP-γ (:func:`gamma_relevance`) as a Zennit hook, equal to :class:`zennit.rules.Gamma`.

    For ``x ≥ 0`` (checked per call) the forward computes one modified forward (``z⁺``), and the ``g⁻`` terms only
    when the upper relevance reaches outputs ``≤ 0``.

    Parameters
    ----------
    gamma: float
        The weight of the parts added to the weights and bias.
    stabilizer: float or callable
        Stabiliser of the denominators, see :func:`stabilize`.
    zero_params: str or list of str, optional
        See :class:`FastRule`.
    """
    def __init__(self, gamma=0.25, stabilizer=1e-6, zero_params=None):
        super().__init__(zero_params)
        self.gamma = gamma
        self.stabilizer = stabilizer

    def copy(self):
        return Gamma(self.gamma, self.stabilizer, self.zero_params)

    def prepare(self, module, input, output):
        weight, bias = rule_parameters(module, self.zero_params)
        positive_weight, positive_bias = gamma_parameters(weight, bias, self.gamma, 1)
        if input.min() >= 0:
            denominator, workspace = gamma_denominator(
                module, (input,), (positive_weight,), positive_bias, output, self.stabilizer, 1
            )
            return (positive_weight, denominator), workspace
        negative_weight, negative_bias = gamma_parameters(weight, bias, self.gamma, -1)
        inputs = (input.clamp(min=0), input.clamp(max=0))
        positive_denominator, _ = gamma_denominator(
            module, inputs, (positive_weight, negative_weight), positive_bias, output, self.stabilizer, 1
        )
        negative_denominator, _ = gamma_denominator(
            module, inputs, (negative_weight, positive_weight), negative_bias, output, self.stabilizer, -1
        )
        return (positive_weight, positive_denominator, negative_weight, negative_denominator), None

    def relevance(self, module, input, grad_output, workspace, positive_weight, positive_denominator, *negative):
        if negative:
            return gamma_relevance(module, (input.clamp(min=0), input.clamp(max=0)), grad_output,
                                   (positive_weight, negative[0]), (positive_denominator, negative[1]))
        negative_weight = negative_denominator = None
        if reaches_masked(grad_output, positive_denominator, workspace):
            # the g⁻ terms, computed only now that relevance reaches outputs ≤ 0
            negative_weight, negative_bias = gamma_parameters(
                *rule_parameters(module, self.zero_params), self.gamma, -1
            )
            output = layer_forward(module, (input,), (module.weight,), module.bias)
            negative_denominator, _ = gamma_denominator(
                module, (input,), (negative_weight,), negative_bias, output, self.stabilizer, -1
            )
        return gamma_relevance(module, (input, None), grad_output, (positive_weight, negative_weight),
                               (positive_denominator, negative_denominator), workspace)


class ZBox(FastRule):
    """The z^B rule (:func:`zbox_relevance`) as a Zennit hook, equal to :class:`zennit.rules.ZBox` for given bounds.

    Parameters
    ----------
    low, high: float, torch.Tensor or None
        The smallest and largest input values, broadcastable to the input (e.g. shaped ``(1, C, 1, 1)``). ``None``
        takes them from each input sample: per sample and channel its minimum or maximum (see :func:`input_bounds`).
    stabilizer: float or callable
        Stabiliser of the denominator, see :func:`stabilize`.
    zero_params: str or list of str, optional
        See :class:`FastRule`.
    """
    def __init__(self, low=None, high=None, stabilizer=1e-6, zero_params=None):
        super().__init__(zero_params)
        self.low, self.high = low, high
        self.stabilizer = stabilizer

    def copy(self):
        return ZBox(self.low, self.high, self.stabilizer, self.zero_params)

    def prepare(self, module, input, output):
        low, high = input_bounds(module, input, self.low, self.high)
        weights, denominator, workspace = zbox_prepare(
            module, input, output, low, high, *rule_parameters(module, self.zero_params), self.stabilizer,
        )
        return (*weights, low, high, denominator), workspace

    def relevance(self, module, input, grad_output, workspace, weight, positive_weight, negative_weight, low, high,
                  denominator):
        return zbox_relevance(module, input, grad_output, (weight, positive_weight, negative_weight), low, high,
                              denominator, workspace)
