"""Zennit composites that map the layer groups of a feed-forward network to LRP rules: the seed study's mapping for
VGG networks, on any network of convolutions, pools and linear layers run one after the other.

The groups follow from the order in which the leaf modules run, never from layer indices or attribute names. In that
order block ``k`` holds the layers after the ``(k - 1)``-th max-pool, and the default mapping is the seed study's
figure:

============================================  ===================================================================
layers                                        rule
============================================  ===================================================================
first convolution or linear layer (conv1_1)   z^B (ZBox) with the input's bounds ``low``, ``high``, or each sample's
other convolutions, blocks 1-3                LRP-γ
convolutions, blocks 4-5                      LRP-ε  (the boundary is ``epsilon_from_block``)
linear layers after the last convolution      LRP-0  (LRP-ε on the first ``epsilon_linears``)
activations (ReLU)                            Pass
average pools                                 Norm
max-pools, dropout, flatten                   gradient (winner takes all / identity)
============================================  ===================================================================

Convolutions are ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d``; a linear layer before the last convolution is
ruled like the convolutions of its block.

Which order. A Zennit composite registers its rules when its context is entered, before any input is seen, and
:func:`rule_table`, ``lrp-brain check`` and the sweep engine need the mapping without an input, so a probe forward
pass (which needs an input shape) cannot decide it. The mapping is therefore read from the order in which the model
registers its leaf modules (``model.named_modules()``), which is the forward order of every ``nn.Sequential``, of
torchvision's VGGs (``features``, ``avgpool``, ``classifier``), of graphs converted by ``torch.fx`` or ONNX importers
(modules in node order) and of Zennit's test models; and the first forward pass in the composite's context checks
it: it records the order in which the leaf modules really run, derives the groups from that order, and raises a
``ValueError`` naming the first layer whose rule would differ. Residual sums between modules are not seen (as by
Zennit's layer-map composites).

The z^B bounds cannot silently be wrong: given bounds are checked against the input of the first layer at every call
(``check_bounds``), and without bounds (``low=None, high=None``, the default) each sample's own per-channel minimum
and maximum are used, a box that always contains the input.
"""
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch
from torch import nn
from zennit import rules as zennit_rules
from zennit.composites import COMPOSITES, register_composite
from zennit.core import Composite, Hook, RemovableHandleList, expand
from zennit.rules import Norm, Pass
from zennit.types import Activation, AvgPool, Convolution, MaxPool

from lrp_brain import rules as fast_rules
from lrp_brain.canonizers import MergeBatchNormIntoNext, MergeBatchNormIntoPrevious, leaf_modules

#: Stabiliser added (with the sign of the denominator) by every rule whose own parameter does not stabilise it: LRP-0
#: and LRP-ε with ε = 0, LRP-γ, z^B and Norm. It is Zennit's default.
STABILIZER = 1e-6

#: How far, as a fraction of ``high - low``, the first layer's input may lie outside given z^B bounds (at least four
#: units of the input's floating point precision): bilinear resizing with antialiasing overshoots [0, 1] by up to
#: 4.8e-7 in float32 (measured; the project's transform clamps anyway), and mean/std normalisation in float32 differs
#: from the float64 bounds by a few units of rounding. An input in other units (ImageNet-normalised against 0 and 1,
#: 0-255 against 0 and 1) is outside by far more.
BOUNDS_TOLERANCE = 1e-4

#: ImageNet's per-channel statistics, for the hint of the bounds error.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Leaf modules that are the identity (or a reshape) in evaluation mode.
_IDENTITY = (nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten, nn.Identity)

#: The rule in words of the groups whose rule is the plain gradient (no hook).
_GRADIENT_RULES = {
    'maxpool': 'gradient (winner takes all)',
    'batchnorm': 'merged by a canonizer',
    'identity': 'identity (gradient)',
    'uncovered': 'none: not covered by the mapping',
}


@dataclass(frozen=True)
class LayerRule:
    """One row of the rule mapping: which rule a leaf module of the model gets.

    Attributes
    ----------
    name: str
        The module's name in the model, e.g. ``'features.2'``.
    layer: str
        The readable name, e.g. ``'conv1_2'``, ``'fc1'``, ``'pool3'``.
    module: str
        The module's class name.
    group: str
        The layer group: ``'first_conv'`` (the first convolution or linear layer), ``'gamma_conv'``,
        ``'epsilon_conv'``, ``'epsilon_linear'``, ``'linear'``, ``'activation'``, ``'avgpool'``, ``'maxpool'``,
        ``'batchnorm'``, ``'identity'`` or ``'uncovered'`` (no rule: LRP would silently fall back to the gradient
        there).
    rule: str
        The rule in words, e.g. ``'LRP-γ (γ=0.1)'``.
    hook: zennit.core.Hook or None
        The hook template the composite registers, or ``None`` where the plain gradient is the rule.
    block: int
        The block (1-based: the number of max-pools before the module, plus one) of a module of the convolutional
        part; 0 after it (average pool, flattening, the linear layers after the last convolution).
    """
    name: str
    layer: str
    module: str
    group: str
    rule: str
    hook: Optional[Hook] = None
    block: int = 0


def zbox_bounds(transform):
    """Derive the z^B bounds ``(low, high)`` from the input transform that produced the network's input.

    Parameters
    ----------
    transform: mapping or object
        Anything with the keys or attributes ``value_range`` (the pixel range before normalisation, default
        ``(0, 1)``), and optionally ``mean`` and ``std`` (per-channel normalisation ``(x - mean) / std``). The
        project's own :class:`lrp_brain.data.Transform` and the ``transform`` entry of its checkpoints are such.

    Returns
    -------
    low, high: float or torch.Tensor
        The smallest and largest value an input pixel can take: ``value_range`` itself without normalisation, else
        per channel ``(value_range - mean) / std`` as tensors shaped ``(1, C, 1, 1)``.
    """
    def get(key, default=None):
        if isinstance(transform, dict):
            return transform.get(key, default)
        return getattr(transform, key, default)

    lowest, highest = (float(value) for value in get('value_range', (0., 1.)))
    mean, std = get('mean'), get('std')
    if mean is None and std is None:
        return lowest, highest
    if mean is None or std is None:
        raise ValueError(f'zbox_bounds: transform has mean={mean!r} but std={std!r}; both or neither are needed')
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    if (std <= 0).any():
        raise ValueError(f'zbox_bounds: transform std must be positive, got {std.flatten().tolist()}')
    return ((lowest - mean) / std).float(), ((highest - mean) / std).float()


def _check_parameter(name, value, allow_negative):
    if callable(value) and not isinstance(value, Real):
        raise ValueError(f'{name} must be a number, got {value!r}')
    value = float(value)
    if value != value or value in (float('inf'), float('-inf')):
        raise ValueError(f'{name} must be finite, got {value}')
    if value < 0 and not allow_negative:
        raise ValueError(
            f'{name} must be >= 0, got {value}; negative values turn the rule into its opposite and are only '
            f'accepted with allow_negative=True (to reproduce the seed study grid)'
        )
    return value


def _check_bounds(low, high):
    if low is None and high is None:
        return
    if low is None or high is None:
        raise ValueError(f'give both z^B bounds or neither (None: each sample\'s own), got low={low!r}, high={high!r}')
    low_tensor, high_tensor = torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
    try:
        ordered = torch.broadcast_tensors(low_tensor, high_tensor)
    except RuntimeError as error:
        raise ValueError(f'low {tuple(low_tensor.shape)} and high {tuple(high_tensor.shape)} do not broadcast') \
            from error
    if not torch.isfinite(low_tensor).all() or not torch.isfinite(high_tensor).all():
        raise ValueError(f'low and high must be finite, got low={low!r}, high={high!r}')
    if not (ordered[0] < ordered[1]).all():
        raise ValueError(f'low must be < high everywhere, got low={low!r}, high={high!r}')


def _kind(module):
    """What decides the group of a leaf module: ``'conv'``, ``'linear'``, ``'maxpool'``, ``'avgpool'``,
    ``'batchnorm'``, ``'activation'``, ``'identity'`` or ``'other'``."""
    kinds = [
        ('conv', Convolution), ('linear', nn.Linear), ('maxpool', MaxPool), ('avgpool', AvgPool),
        ('batchnorm', nn.modules.batchnorm._BatchNorm), ('activation', Activation), ('identity', _IDENTITY),
    ]
    return next((kind for kind, types in kinds if isinstance(module, types)), 'other')


def layer_groups(leaves, epsilon_from_block=4, epsilon_linears=0):
    """Name and group the leaf modules of a feed-forward network from the order they run in.

    The convolutional part runs up to the last convolution or max-pool before the first linear layer after the last
    convolution, and takes the activations and BatchNorms right after it; its modules are named the way the VGG
    paper does (``conv2_1``, ``relu2_1``, ``pool2``, ``bn2_1``), block by block. The modules after it are named by
    their module name (``avgpool``) up to the first linear layer, from where the linear layers are ``fc1``, ``fc2``,
    ... and the modules after ``fcN`` are named ``relu_fcN``, ``dropout_fcN``.

    Parameters
    ----------
    leaves: list of (str, torch.nn.Module)
        The leaf modules in forward order, with their names in the model.
    epsilon_from_block, epsilon_linears: int
        As for :class:`VGGComposite`.

    Returns
    -------
    list of (str, str, int)
        ``(readable name, group, block)`` per leaf (see :class:`LayerRule`).
    """
    kinds = [_kind(module) for _, module in leaves]
    count = len(kinds)
    last_conv = max((index for index, kind in enumerate(kinds) if kind == 'conv'), default=-1)
    head = next((index for index in range(last_conv + 1, count) if kinds[index] == 'linear'), count)
    body = max((index for index in range(head) if kinds[index] in ('conv', 'maxpool')), default=-1) + 1
    while body < head and kinds[body] in ('activation', 'batchnorm'):
        body += 1
    first = next((index for index, kind in enumerate(kinds) if kind in ('conv', 'linear')), None)

    rows, block, position, fc_count, head_linears = [], 1, 0, 0, 0
    for index, ((name, module), kind) in enumerate(zip(leaves, kinds)):
        type_name = type(module).__name__.lower()
        module_block = 0
        if index < body:
            module_block = block
            position += kind in ('conv', 'linear')
            layer = {'conv': f'conv{block}_{position}', 'maxpool': f'pool{block}',
                     'batchnorm': f'bn{block}_{position}'}.get(kind, f'{type_name}{block}_{position}')
            if kind == 'maxpool':
                block, position = block + 1, 0
        elif index < head:
            layer = name
        else:
            fc_count += kind == 'linear'
            layer = f'fc{fc_count}' if kind == 'linear' else f'{type_name}_fc{fc_count}'

        if index == first:
            group = 'first_conv'
        elif kind in ('conv', 'linear') and index < head:
            group = 'gamma_conv' if module_block < epsilon_from_block else 'epsilon_conv'
        elif kind == 'linear':
            head_linears += 1
            group = 'epsilon_linear' if head_linears <= epsilon_linears else 'linear'
        else:
            group = 'uncovered' if kind == 'other' else kind
        rows.append((layer, group, module_block))
    return rows


def _format(value):
    if isinstance(value, torch.Tensor):
        flat = value.flatten()
        return f'{flat.item():g}' if flat.numel() == 1 else '[' + ', '.join(f'{item:.3g}' for item in flat) + ']'
    return f'{value:g}'


def _range_in_words(values):
    """``'[-2.12, 2.64]'``, and for inputs with channels (``ndim > 2``) the range of each channel."""
    words = f'[{values.min().item():.3g}, {values.max().item():.3g}]'
    if values.ndim > 2:
        dims = tuple(dim for dim in range(values.ndim) if dim != 1)
        lows, highs = values.amin(dim=dims), values.amax(dim=dims)
        words += ' (per channel ' + ', '.join(f'[{low:.3g}, {high:.3g}]' for low, high in zip(lows, highs)) + ')'
    return words


def check_input_bounds(layer, input, low, high):
    """Raise a ``ValueError`` unless ``input`` lies within the z^B bounds ``[low, high]`` up to the tolerance.

    The tolerance is :data:`BOUNDS_TOLERANCE` times ``high - low`` (at least four units of ``input``'s precision),
    per element, so per channel for per-channel bounds. The message names the observed range per channel, the bounds
    and how to derive the right ones.

    Parameters
    ----------
    layer: str
        The first layer's name, for the message.
    input: torch.Tensor
        The first layer's input.
    low, high: float or torch.Tensor
        The bounds, broadcastable to ``input`` as for Zennit's ``ZBox``.
    """
    values = input.detach()
    low_tensor, high_tensor = (torch.as_tensor(bound).to(values) for bound in (low, high))
    margin = (high_tensor - low_tensor) * max(BOUNDS_TOLERANCE, 4 * torch.finfo(values.dtype).eps)
    lowest = expand(low_tensor - margin, values.shape, cut_batch_dim=True)
    highest = expand(high_tensor + margin, values.shape, cut_batch_dim=True)
    if not ((values < lowest).any() or (values > highest).any()):
        return
    imagenet_low, imagenet_high = zbox_bounds({'mean': IMAGENET_MEAN, 'std': IMAGENET_STD})
    raise ValueError(
        f'the input of the first layer {layer} lies in {_range_in_words(values)}, outside the z^B bounds '
        f'low={_format(low)}, high={_format(high)}: the first layer\'s relevance would be wrong. Give the bounds of '
        f'the preprocessing, lrp_brain.composites.zbox_bounds(transform) (for [0, 1] pixels normalised with '
        f'ImageNet\'s mean and std: low={_format(imagenet_low)}, high={_format(imagenet_high)}), or low=None, '
        f'high=None to take each sample\'s own per-channel minimum and maximum; check_bounds=False turns this check '
        f'off'
    )


class SampleBoundsZBox(zennit_rules.ZBox):
    """Zennit's own z^B rule with each input sample's bounds: the rule of ``VGGComposite(fast=False)`` without bounds.

    :class:`zennit.rules.ZBox` takes fixed bounds when it is built; here its two bound modifiers are replaced by the
    bounds of :func:`lrp_brain.rules.input_bounds` ``(layer, x, None, None)`` (per sample and channel, or per sample
    for a linear layer, the minimum and maximum of the input ``x``). The formula is Zennit's.

    Parameters
    ----------
    layer: torch.nn.Module
        The layer the rule is for (its type decides what a channel is).
    stabilizer, zero_params:
        As for :class:`zennit.rules.ZBox`.
    """
    def __init__(self, layer, stabilizer=STABILIZER, zero_params=None):
        super().__init__(low=0., high=1., stabilizer=stabilizer, zero_params=zero_params)

        def bound(index):
            return lambda input: fast_rules.input_bounds(layer, input, None, None)[index].expand_as(input)

        self.input_modifiers = [self.input_modifiers[0], bound(0), bound(1)]


class VGGComposite(Composite):
    """The seed study's rule mapping for VGG-family and other feed-forward networks as a Zennit composite.

    Parameters
    ----------
    epsilon: float
        ε of the LRP-ε rule on the convolutions from block ``epsilon_from_block`` on (and on the first
        ``epsilon_linears`` linear layers after the last convolution). Must be >= 0; ε = 0 is LRP-0 (stabilised by
        :data:`STABILIZER`).
    gamma: float
        γ of the LRP-γ rule on the convolutions of the blocks before ``epsilon_from_block`` (not the first one).
        Must be >= 0; γ = 0 is LRP-0.
    low, high: float, torch.Tensor or None
        The z^B bounds of the first layer: the smallest and largest input value, broadcastable to the input. Derive
        them from the preprocessing with :func:`zbox_bounds` (0 and 1 for min–max to [0, 1]). ``None`` (both, the
        default) takes each input sample's own per-channel minimum and maximum (see
        :func:`lrp_brain.rules.input_bounds`): a box that always contains the input and does not depend on the batch.
    epsilon_from_block: int
        The first block that gets LRP-ε instead of LRP-γ (4 in the study).
    epsilon_linears: int
        How many of the linear layers after the last convolution get LRP-ε instead of LRP-0 (the seed README's
        variant uses 1 or 2; the figure and the default use 0).
    std_epsilon: bool
        If ``True``, the ε of each ε layer is scaled by the standard deviation of that layer's output, per sample
        (Montavon et al. use ε = 0.25·std).
    zero_bias: bool
        If ``True``, every rule ignores the layers' biases (the "zero-bias" LRP variants).
    fast: bool
        Use the project's fast rules (:mod:`lrp_brain.rules`, equal to Zennit's rules to rounding) instead of Zennit's
        own :mod:`zennit.rules` (with :class:`SampleBoundsZBox` for z^B without bounds).
    canonizers: list of zennit.canonizers.Canonizer, optional
        Canonizers applied before the rules. The default merges every BatchNorm into the convolution or linear
        layer before it (as Zennit's VGG canonizer does, but exactly: zennit 0.5.1's merge leaves a factor
        1/sqrt(1 + eps)) and a BatchNorm that follows an activation into the linear layer after it.
    allow_negative: bool
        Accept negative ε and γ. Only for reproducing the seed study's grid; such settings are not LRP.
    check_bounds: bool
        With given bounds, check at every call of the first layer that its input lies within them (see
        :func:`check_input_bounds`) and raise a ``ValueError`` otherwise. ``False`` turns the check off.

    The composite registers all or nothing: if a rule cannot attach to a layer, everything registered so far is
    removed (and the canonizers undone) before the error propagates.
    """
    def __init__(
        self,
        epsilon=0.25,
        gamma=0.1,
        low=None,
        high=None,
        *,
        epsilon_from_block=4,
        epsilon_linears=0,
        std_epsilon=False,
        zero_bias=False,
        fast=True,
        canonizers=None,
        allow_negative=False,
        check_bounds=True,
    ):
        self.epsilon = _check_parameter('epsilon', epsilon, allow_negative)
        self.gamma = _check_parameter('gamma', gamma, allow_negative)
        _check_bounds(low, high)
        if int(epsilon_from_block) != epsilon_from_block or epsilon_from_block < 1:
            raise ValueError(f'epsilon_from_block must be an integer >= 1, got {epsilon_from_block!r}')
        if int(epsilon_linears) != epsilon_linears or epsilon_linears < 0:
            raise ValueError(f'epsilon_linears must be an integer >= 0, got {epsilon_linears!r}')
        self.low, self.high = low, high
        self.epsilon_from_block = int(epsilon_from_block)
        self.epsilon_linears = int(epsilon_linears)
        self.std_epsilon = bool(std_epsilon)
        self.zero_bias = bool(zero_bias)
        self.fast = bool(fast)
        self.check_bounds = bool(check_bounds)
        if canonizers is None:
            canonizers = [MergeBatchNormIntoPrevious(), MergeBatchNormIntoNext()]
        self._hooks = {}
        super().__init__(module_map=self._module_map, canonizers=canonizers)

    def _first_rule(self, layer, zero_params):
        """Return the z^B rule of the first layer ``layer`` in words and as a hook template."""
        if self.low is not None:
            rule = (fast_rules if self.fast else zennit_rules).ZBox(
                low=self.low, high=self.high, stabilizer=STABILIZER, zero_params=zero_params
            )
            return f'z^B (low={_format(self.low)}, high={_format(self.high)})', rule
        where = '' if isinstance(layer, nn.Linear) else 'per-channel '
        words = f'z^B (low, high: each sample\'s {where}minimum and maximum)'
        if self.fast:
            return words, fast_rules.ZBox(None, None, stabilizer=STABILIZER, zero_params=zero_params)
        return words, SampleBoundsZBox(layer, stabilizer=STABILIZER, zero_params=zero_params)

    def _rules(self, first_layer):
        """Return the rule (in words, and as a hook template) of each group bound to this composite's parameters."""
        zero_params = ['bias'] if self.zero_bias else None
        rules = fast_rules if self.fast else zennit_rules
        epsilon_value = self.epsilon if self.epsilon != 0 else STABILIZER
        if self.std_epsilon:
            epsilon_value = fast_rules.StdStabilizer(epsilon_value)
        epsilon_name = f'LRP-ε (ε={self.epsilon:g}{"·std" if self.std_epsilon else ""})'
        return {
            'first_conv': self._first_rule(first_layer, zero_params),
            'gamma_conv': (
                f'LRP-γ (γ={self.gamma:g})',
                rules.Gamma(gamma=self.gamma, stabilizer=STABILIZER, zero_params=zero_params),
            ),
            'epsilon_conv': (epsilon_name, rules.Epsilon(epsilon=epsilon_value, zero_params=zero_params)),
            'epsilon_linear': (epsilon_name, rules.Epsilon(epsilon=epsilon_value, zero_params=zero_params)),
            'linear': ('LRP-0', rules.Epsilon(epsilon=STABILIZER, zero_params=zero_params)),
            'activation': ('Pass', Pass()),
            'avgpool': ('Norm', Norm(stabilizer=STABILIZER)),
        }

    def layer_rules(self, model):
        """Return the rule of every leaf module of ``model``, in module order.

        Parameters
        ----------
        model: torch.nn.Module
            A feed-forward network whose leaf modules are registered in the order its forward pass runs them (see
            the module's docstring), e.g. a torchvision VGG or an ``nn.Sequential``.

        Returns
        -------
        list of LayerRule
            One entry per leaf module.
        """
        leaves = leaf_modules(model)
        groups = layer_groups(leaves, self.epsilon_from_block, self.epsilon_linears)
        first = next((module for (_, module), (_, group, _) in zip(leaves, groups) if group == 'first_conv'), None)
        rules = self._rules(first)
        table = []
        for (name, module), (layer, group, block) in zip(leaves, groups):
            rule, hook = rules[group] if group in rules else (_GRADIENT_RULES[group], None)
            table.append(LayerRule(name, layer, type(module).__name__, group, rule, hook, block))
        return table

    def register(self, module):
        """Apply the canonizers and register the rules to ``module`` (see :class:`zennit.core.Composite`), with the
        bounds check on the first layer and the forward-order check of the first forward pass; all or nothing."""
        rows = self.layer_rules(module)
        leaves = dict(leaf_modules(module))
        self._hooks = {row.name: row.hook for row in rows if row.hook is not None}
        try:
            super().register(module)
            modules = dict(module.named_modules())
            first = next((row.name for row in rows if row.group == 'first_conv'), None)
            if first is not None and self.low is not None and self.check_bounds:
                self.handles.append(modules[first].register_forward_pre_hook(
                    lambda layer, args: check_input_bounds(first, args[0], self.low, self.high)
                ))
            self.handles.append(self._watch_order(module, modules, rows, leaves))
        except BaseException:
            self.remove()
            raise

    def _watch_order(self, root, modules, rows, leaves):
        """Record the order in which the leaf modules run in the first forward pass of ``root``; at its end remove the
        recording and compare the groups of that order with ``rows`` (see :meth:`_check_order`).

        ``modules`` are ``root``'s modules after the canonizers, ``leaves`` its leaf modules before them (whose types
        the rows were derived from).
        """
        ran, handles = [], RemovableHandleList()
        for row in rows:
            handles.append(modules[row.name].register_forward_pre_hook(
                lambda module, args, name=row.name: ran.append(name)
            ))

        def compare(module, args, output):
            handles.remove()
            order = list(dict.fromkeys(ran))
            self._check_order(rows, order, [(name, leaves[name]) for name in order])

        handles.append(root.register_forward_hook(compare))
        return handles

    def _check_order(self, rows, order, ran):
        """Raise a ``ValueError`` if a leaf module gets another group from the order ``ran`` (names and modules, as
        they ran) than ``rows`` (from the registration order) gave it."""
        by_name = {row.name: row for row in rows}
        for (name, _), (_, group, _) in zip(ran, layer_groups(ran, self.epsilon_from_block, self.epsilon_linears)):
            row = by_name[name]
            if row.group != group:
                raise ValueError(
                    f'{type(self).__name__} took the layer groups from the order in which the model registers its '
                    f'modules, but the forward pass runs them in another order ({", ".join(order[:8])}'
                    f'{", ..." if len(order) > 8 else ""}): {name} ({row.module}) is in group {row.group!r} by '
                    f'registration but {group!r} by the forward pass, so its rule would be wrong. Register the layers '
                    f'in the order the forward pass uses them (e.g. as an nn.Sequential)'
                )

    def _module_map(self, ctx, name, module):
        return self._hooks.get(name)


def rule_table(model, **composite_kwargs):
    """Return the rule mapping of ``model`` under :class:`VGGComposite` (``composite_kwargs``) as rows.

    Returns
    -------
    list of LayerRule
        One row per leaf module; ``str(row.rule)`` is the rule in words. :func:`format_rule_table` prints them.
    """
    return VGGComposite(**composite_kwargs).layer_rules(model)


def format_rule_table(rows):
    """Format the rows of :func:`rule_table` as a fixed-width text table."""
    lines = [f'{"module":<16} {"layer":<12} {"type":<18} rule']
    lines += [f'{row.name:<16} {row.layer:<12} {row.module:<18} {row.rule}' for row in rows]
    return '\n'.join(lines)


if 'lrp_brain_vgg' not in COMPOSITES:
    register_composite('lrp_brain_vgg')(VGGComposite)
