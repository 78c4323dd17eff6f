"""Fast LRP rules as Zennit hooks: ε, γ and z^B for ``Conv2d`` and ``Linear`` layers.

Each rule equals Zennit's rule of the same name (:class:`zennit.rules.Epsilon`, :class:`zennit.rules.Gamma`,
:class:`zennit.rules.ZBox`) to rounding, and is used the same way: in any Zennit composite, copied per layer by the
composite, removed with it, switched off by :meth:`zennit.core.Composite.inactive`.

They are faster because they do less. Zennit's rules let the layer's own backward run, throw its result away and
recompute the relevance from several modified forward passes (Gamma five, ZBox three). Here a forward hook passes
the layer's output on through one custom autograd node whose backward returns the relevance of the layer input
directly; the layer's own backward never runs. For a layer with input ``x``, output ``z = Wx + b``, upper relevance
``g`` (Zennit sends relevance through the gradient) and ``Wᵀ`` the layer's input gradient (a transposed convolution
or a matrix product):

- LRP-ε: ``R = x ⊙ Wᵀ (g / s(z))`` with the stabiliser ``s``: no modified forward at all.
- LRP-γ, inputs ``x ≥ 0`` (after a ReLU or max-pool, checked at run time): with ``W⁺ = W + γ·max(W, 0)`` and
  ``b⁺`` likewise, ``R = x ⊙ W⁺ᵀ ([z > 0] g / s(W⁺x + b⁺))``: one modified forward instead of five. The part of
  Zennit's generalised rule for negative outputs is added only when ``g`` is non-zero where ``z ≤ 0`` (never behind
  a ReLU), which one reduction tells.
- LRP-γ with inputs of both signs (the first layer, or any layer after a signed one) and z^B: Zennit's generalised
  formulas written out; z^B's two bound terms are one layer call on channel-stacked inputs, its three transposed
  passes one call with stacked weights.

Modified weights are computed once per forward call, elementwise steps run in place on tensors the rule owns, and
only what the backward needs is kept. The hooked layers' parameters get no gradient: their autograd node is cut out.
"""
import torch
from torch import nn
from torch.nn import functional
from zennit.core import Hook, RemovableHandle, RemovableHandleList, expand


class RuleError(ValueError):
    """A rule was given a module it cannot handle."""


class StdStabilizer:
    """Stabilise a denominator ``z`` by ε times its standard deviation: ``z + sign(z)·ε·std(z)``.

    The standard deviation is the population one (``correction=0``) over all but the batch dimension, so every
    sample gets its own ε; ``sign(0) = +1`` as in Zennit.
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
    stabilizer: float or callable
        A number ``ε`` gives ``value + sign(value)·ε`` with ``sign(0) = +1``; a callable (e.g.
        :class:`StdStabilizer`) is applied to ``value`` and must not change it.
    """
    if callable(stabilizer):
        return stabilizer(value)
    return _signed_shift(value, stabilizer).add_(value)


def _signed_shift(value, epsilon):
    """Return ``sign(value)·ε`` with ``sign(0) = +1``, in one pass.

    ``copysign`` reads the sign bit, so ``-0.0`` gets ``-ε`` where Zennit gives ``+ε``; sums of products, what a
    layer returns, are ``+0.0`` when they are zero.
    """
    return torch.copysign(torch.tensor(float(epsilon), dtype=value.dtype), value)


def _padding(module):
    """Return the explicit zero padding of a ``Conv2d`` (``'valid'`` and symmetric ``'same'`` resolved)."""
    if not isinstance(module.padding, str):
        return module.padding
    if module.padding == 'valid':
        return (0, 0)
    totals = [dilation * (size - 1) for dilation, size in zip(module.dilation, module.kernel_size)]
    if any(total % 2 for total in totals):
        raise RuleError(
            f"{module}: padding='same' with an even kernel pads asymmetrically; give the padding as numbers"
        )
    return tuple(total // 2 for total in totals)


def check_module(module):
    """Raise :class:`RuleError` unless the fast rules can handle ``module``: a zero-padded Conv2d or a Linear."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != 'zeros':
            raise RuleError(f"{module}: padding_mode={module.padding_mode!r} is not supported, only 'zeros'")
        _padding(module)
    elif not isinstance(module, nn.Linear):
        raise RuleError(
            f'lrp_brain.rules handle Conv2d and Linear layers, not {type(module).__name__} ({module}); use a Zennit '
            f'rule for it'
        )


def _stack(tensors, module, dim):
    """Concatenate ``tensors`` along the (input) feature dimension ``dim`` as a stacked layer expects them.

    The input channels of a convolution with ``groups > 1`` are seen in groups, so the tensors are interleaved group
    by group; weights (``module=None``) already hold the channels of one group along ``dim``.
    """
    if len(tensors) == 1:
        return tensors[0]
    groups = getattr(module, 'groups', 1)
    if groups == 1:
        return torch.cat(tensors, dim)
    return torch.cat([tensor.unflatten(dim, (groups, -1)) for tensor in tensors], dim + 1).flatten(dim, dim + 1)


def layer_forward(module, inputs, weights, bias):
    """Return ``Σ_k layer(inputs[k]; weights[k]) + bias`` for the layer ``module`` (``Conv2d`` or ``Linear``).

    Several terms are computed as one layer call on the stacked inputs and weights.
    """
    feature_dim = 1 if isinstance(module, nn.Conv2d) else -1
    input, weight = _stack(inputs, module, feature_dim), _stack(weights, None, 1)
    if isinstance(module, nn.Conv2d):
        return functional.conv2d(input, weight, bias, module.stride, _padding(module), module.dilation, module.groups)
    return functional.linear(input, weight, bias)


def layer_backward(module, input, weights, grad_output):
    """Return ``[weight_kᵀ grad_output for each of weights]``: the input gradients of ``layer(input; weight_k)``.

    Several weights are handled by one transposed call with the weights stacked along the input features.
    """
    weight = _stack(weights, None, 1)
    if isinstance(module, nn.Conv2d):
        # the input only gives the shape; a stacked one is a zero-stride stand-in
        stacked_input = input if len(weights) == 1 else \
            input.new_empty(()).expand(input.shape[:1] + (input.shape[1] * len(weights),) + input.shape[2:])
        stacked = torch.ops.aten.convolution_backward(
            grad_output, stacked_input, weight, None, module.stride, _padding(module), module.dilation, False,
            (0, 0), module.groups, (True, False, False),
        )[0]
        feature_dim = 1
    else:
        stacked = grad_output.matmul(weight)
        feature_dim = stacked.ndim - 1
    if len(weights) == 1:
        return [stacked]
    groups = getattr(module, 'groups', 1)
    grouped = stacked.unflatten(feature_dim, (groups, len(weights), -1))
    return [grouped.select(feature_dim + 1, index).flatten(feature_dim, feature_dim + 1)
            for index in range(len(weights))]


def _zero_names(zero_params):
    if zero_params is None:
        return ()
    return (zero_params,) if isinstance(zero_params, str) else tuple(zero_params)


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
    (the backward) and :meth:`copy`. A large allocation costs more than a pass over its memory (fresh pages are
    zeroed by the kernel), so a tensor the forward needed only for a while is handed on as the backward's workspace
    instead of being allocated again there.

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
            If ``module`` is neither a zero-padded ``Conv2d`` nor a ``Linear``.
        """
        check_module(module)
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self.forward)])

    def forward(self, module, input, output):
        """Forward hook: route the output through the rule's autograd node when a gradient will reach the input."""
        if not (torch.is_grad_enabled() and input[0].requires_grad):
            return None
        return _RuleNode.apply(self, module, input[0], output.detach())

    def parameters(self, module):
        """Return ``(weight, bias)`` of ``module``, each replaced by zeros if named in ``zero_params``."""
        names = _zero_names(self.zero_params)
        weight = torch.zeros_like(module.weight) if 'weight' in names else module.weight
        bias = module.bias
        if bias is not None and 'bias' in names:
            bias = torch.zeros_like(bias)
        return weight, bias

    def prepare(self, module, input, output):
        """Return ``(saved, workspace)``: the tensors the backward needs, and a tensor shaped like ``output`` it may
        overwrite (or ``None``). Runs in the forward pass, without autograd."""
        raise NotImplementedError

    def relevance(self, module, input, grad_output, workspace, *saved):
        """Return the relevance of ``input`` from the upper relevance ``grad_output`` and :meth:`prepare`'s
        tensors."""
        raise NotImplementedError


class Epsilon(FastRule):
    """LRP-ε, equal to :class:`zennit.rules.Epsilon`: ``R = x ⊙ Wᵀ (g / s(z))``.

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
        weight, bias = self.parameters(module)
        if weight is not module.weight or bias is not module.bias:
            output = layer_forward(module, (input,), (weight,), bias)
        return (weight, stabilize(output, self.epsilon)), None

    def relevance(self, module, input, grad_output, workspace, weight, denominator):
        gradient, = layer_backward(module, input, (weight,), grad_output / denominator)
        return gradient.mul_(input)


class Gamma(FastRule):
    """LRP-γ in Zennit's generalised form, equal to :class:`zennit.rules.Gamma`.

    With ``W⁺ = W + γ·max(W, 0)``, ``W⁻ = W + γ·min(W, 0)`` (the bias likewise) and ``x = x⁺ + x⁻`` split by sign,
    the positive outputs (``z > 0``) are explained by ``z⁺ = W⁺x⁺ + W⁻x⁻ + b⁺`` and the negative ones by
    ``z⁻ = W⁻x⁺ + W⁺x⁻ + b⁻``: ``R = x⁺ ⊙ (W⁺ᵀ g⁺ + W⁻ᵀ g⁻) + x⁻ ⊙ (W⁻ᵀ g⁺ + W⁺ᵀ g⁻)`` with
    ``g^± = [±z > 0] g / s(z^±)``.

    For ``x ≥ 0`` (checked per call) the ``x⁻`` terms vanish, leaving ``R = x ⊙ (W⁺ᵀ g⁺ + W⁻ᵀ g⁻)``, and ``g⁻`` is
    zero unless the upper relevance has non-zeros where ``z ≤ 0`` (never behind a ReLU or max-pool, which pass
    relevance only where the output is positive). The rule then costs one modified forward and one transposed pass;
    the ``g⁻`` term is computed only when such non-zeros exist.

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

    def _modified(self, module, sign):
        """Return ``(W + γ·part(W), b + γ·part(b))`` with ``part`` the positive (``sign > 0``) or negative part."""
        def modify(parameter):
            part = parameter.clamp(min=0) if sign > 0 else parameter.clamp(max=0)
            return part.mul_(self.gamma).add_(parameter)

        weight, bias = self.parameters(module)
        return modify(weight), None if bias is None else modify(bias)

    def _masked_denominator(self, module, inputs, weights, bias, output, sign):
        """Return ``s(Σ_k layer(inputs[k]; weights[k]) + bias) / [sign·output > 0]`` and the mask's memory.

        Dividing by the mask puts ``±inf`` where the output does not have the sign, so ``g / denominator`` is the
        masked, normalised relevance in one step.
        """
        # the terms are added one by one as Zennit does: near-zero denominators amplify a change of rounding
        total = layer_forward(module, inputs[:1], weights[:1], bias)
        for input, weight in zip(inputs[1:], weights[1:]):
            total += layer_forward(module, (input,), (weight,), None)
        compare = torch.gt if sign > 0 else torch.lt
        if callable(self.stabilizer):
            denominator, scratch = self.stabilizer(total), torch.empty_like(output)
        else:
            scratch = _signed_shift(total, self.stabilizer)
            denominator = total.add_(scratch)
        return denominator.div_(compare(output, 0, out=scratch)), scratch

    def prepare(self, module, input, output):
        positive_weight, positive_bias = self._modified(module, 1)
        if input.min() >= 0:
            denominator, workspace = self._masked_denominator(
                module, (input,), (positive_weight,), positive_bias, output, 1
            )
            return (positive_weight, denominator), workspace
        negative_weight, negative_bias = self._modified(module, -1)
        inputs = (input.clamp(min=0), input.clamp(max=0))
        positive_denominator, _ = self._masked_denominator(
            module, inputs, (positive_weight, negative_weight), positive_bias, output, 1
        )
        negative_denominator, _ = self._masked_denominator(
            module, inputs, (negative_weight, positive_weight), negative_bias, output, -1
        )
        return (positive_weight, positive_denominator, negative_weight, negative_denominator), None

    def relevance(self, module, input, grad_output, workspace, positive_weight, positive_denominator, *negative):
        if negative:
            negative_weight, negative_denominator = negative
            positive_part, negative_part = input.clamp(min=0), input.clamp(max=0)
            weights = (positive_weight, negative_weight)
            from_positive = layer_backward(module, input, weights, grad_output / positive_denominator)
            from_negative = layer_backward(module, input, weights[::-1], grad_output / negative_denominator)
            relevance = from_positive[0].add_(from_negative[0]).mul_(positive_part)
            return relevance.addcmul_(from_positive[1].add_(from_negative[1]), negative_part)

        # g · denominator is ±inf where g ≠ 0 and z ≤ 0, NaN where g = 0 and z ≤ 0, finite where z > 0
        outside = not torch.isfinite(torch.nansum(torch.mul(grad_output, positive_denominator, out=workspace)))
        scaled = torch.div(grad_output, positive_denominator, out=workspace)
        gradient, = layer_backward(module, input, (positive_weight,), scaled)
        if outside:
            negative_weight, negative_bias = self._modified(module, -1)
            output = layer_forward(module, (input,), (module.weight,), module.bias)
            negative_denominator, _ = self._masked_denominator(
                module, (input,), (negative_weight,), negative_bias, output, -1
            )
            gradient += layer_backward(module, input, (negative_weight,), grad_output / negative_denominator)[0]
        return gradient.mul_(input)


class ZBox(FastRule):
    """The z^B rule for inputs bounded by ``low ≤ x ≤ high``, equal to :class:`zennit.rules.ZBox`.

    ``R = x ⊙ Wᵀ g' − (l ⊙ W⁺ᵀ g' + h ⊙ W⁻ᵀ g')`` with ``g' = g / s(Wx + b − (W⁺l + b⁺ + W⁻h + b⁻))``, where
    ``W⁺ = max(W, 0)`` and ``W⁻ = min(W, 0)`` (the bias likewise).

    Parameters
    ----------
    low, high: float or torch.Tensor
        The smallest and largest input values, broadcastable to the input (e.g. shaped ``(1, C, 1, 1)``).
    stabilizer: float or callable
        Stabiliser of the denominator, see :func:`stabilize`.
    zero_params: str or list of str, optional
        See :class:`FastRule`.
    """
    def __init__(self, low, high, stabilizer=1e-6, zero_params=None):
        super().__init__(zero_params)
        self.low, self.high = low, high
        self.stabilizer = stabilizer

    def copy(self):
        return ZBox(self.low, self.high, self.stabilizer, self.zero_params)

    def prepare(self, module, input, output):
        weight, bias = self.parameters(module)
        if weight is not module.weight or bias is not module.bias:
            output = layer_forward(module, (input,), (weight,), bias)
        low = expand(self.low, input.shape, cut_batch_dim=True).to(input)
        high = expand(self.high, input.shape, cut_batch_dim=True).to(input)
        positive_weight, negative_weight = weight.clamp(min=0), weight.clamp(max=0)
        # the bias terms max(b, 0) + min(b, 0) add up to b exactly
        bounds = layer_forward(module, (low, high), (positive_weight, negative_weight), bias)
        denominator = stabilize(torch.sub(output, bounds, out=bounds), self.stabilizer)
        return (weight, positive_weight, negative_weight, low, high, denominator), bounds

    def relevance(self, module, input, grad_output, workspace, weight, positive_weight, negative_weight, low, high,
                  denominator):
        from_input, from_low, from_high = layer_backward(
            module, input, (weight, positive_weight, negative_weight),
            torch.div(grad_output, denominator, out=workspace),
        )
        bounds = from_low.mul_(low).addcmul_(from_high, high)
        return from_input.mul_(input).sub_(bounds)
