"""Zennit composites that map the layer groups of a VGG network to LRP rules.

The groups are discovered from the network's structure, never from hard-coded layer indices: block ``k`` holds the
convolutions before the ``k``-th max-pool of ``model.features``, and the fully connected layers are the ``Linear``
modules of ``model.classifier``. The default mapping is the seed study's figure:

==============================  ==========================
layers                          rule
==============================  ==========================
first convolution (conv1_1)     z^B (ZBox) with the input's bounds ``low``, ``high``
other convolutions, blocks 1-3  LRP-γ
convolutions, blocks 4-5        LRP-ε
fully connected layers          LRP-0
activations (ReLU)              Pass
average pools                   Norm
max-pools, dropout, flatten     gradient (winner takes all / identity)
==============================  ==========================
"""
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch
from torch import nn
from zennit import rules as zennit_rules
from zennit.composites import COMPOSITES, register_composite
from zennit.core import Composite, Hook
from zennit.rules import Norm, Pass
from zennit.types import Activation, AvgPool

from lrp_brain import rules as fast_rules
from lrp_brain.canonizers import MergeBatchNormIntoNext, MergeBatchNormIntoPrevious

#: Stabiliser added (with the sign of the denominator) by every rule whose own parameter does not stabilise it: LRP-0
#: and LRP-ε with ε = 0, LRP-γ, z^B and Norm. It is Zennit's default.
STABILIZER = 1e-6


@dataclass(frozen=True)
class LayerRule:
    """One row of the rule mapping: which rule a leaf module of the model gets.

    Attributes
    ----------
    name: str
        The module's name in the model, e.g. ``'features.2'``.
    layer: str
        The readable VGG name, e.g. ``'conv1_2'``, ``'fc1'``, ``'pool3'``.
    module: str
        The module's class name.
    group: str
        The layer group: ``'first_conv'``, ``'gamma_conv'``, ``'epsilon_conv'``, ``'epsilon_linear'``,
        ``'linear'``, ``'activation'``, ``'avgpool'``, ``'maxpool'``, ``'batchnorm'``, ``'identity'`` or
        ``'uncovered'`` (no rule: LRP would silently fall back to the gradient there).
    rule: str
        The rule in words, e.g. ``'LRP-γ (γ=0.1)'``.
    hook: zennit.core.Hook or None
        The hook template the composite registers, or ``None`` where the plain gradient is the rule.
    """
    name: str
    layer: str
    module: str
    group: str
    rule: str
    hook: Optional[Hook] = None


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


def _vgg_parts(model):
    features = getattr(model, 'features', None)
    classifier = getattr(model, 'classifier', None)
    if not isinstance(features, nn.Sequential) or not isinstance(classifier, nn.Module):
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f'VGGComposite expects a VGG-like model with a Sequential `features` (conv blocks separated by '
            f'max-pools) and a `classifier`; {type(model).__name__} has children {children}'
        )
    return features, classifier


def vgg_layer_names(model):
    """Name every leaf module of a VGG-like model the way the VGG paper does.

    Returns
    -------
    dict
        ``{module name: (readable name, group, block)}``, e.g. ``'features.2': ('conv1_2', 'conv', 1)``; ``block`` is
        the conv block (1-based) for modules of ``features`` and 0 for the classifier.
    """
    features, classifier = _vgg_parts(model)
    names = {}
    block, position = 1, 0
    for index, module in features.named_children():
        name = f'features.{index}'
        if isinstance(module, nn.Conv2d):
            position += 1
            names[name] = (f'conv{block}_{position}', 'conv', block)
        elif isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            names[name] = (f'pool{block}', 'maxpool', block)
            block, position = block + 1, 0
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            names[name] = (f'bn{block}_{position}', 'batchnorm', block)
        elif isinstance(module, Activation):
            names[name] = (f'relu{block}_{position}', 'activation', block)
        else:
            names[name] = (f'{type(module).__name__.lower()}{block}_{position}', 'other', block)
    linear_count = 0
    for name, module in classifier.named_modules(prefix='classifier'):
        if list(module.children()):
            continue
        if isinstance(module, nn.Linear):
            linear_count += 1
            names[name] = (f'fc{linear_count}', 'linear', 0)
        else:
            names[name] = (f'{type(module).__name__.lower()}_fc{linear_count}', 'other', 0)
    return names


def _format(value):
    if isinstance(value, torch.Tensor):
        flat = value.flatten()
        return f'{flat.item():g}' if flat.numel() == 1 else '[' + ', '.join(f'{item:.3g}' for item in flat) + ']'
    return f'{value:g}'


class VGGComposite(Composite):
    """The seed study's rule mapping for VGG-family networks as a Zennit composite.

    Parameters
    ----------
    epsilon: float
        ε of the LRP-ε rule on the convolutions from block ``epsilon_from_block`` on (and on the first
        ``epsilon_linears`` fully connected layers). Must be >= 0; ε = 0 is LRP-0 (stabilised by
        :data:`STABILIZER`).
    gamma: float
        γ of the LRP-γ rule on the convolutions of the blocks before ``epsilon_from_block`` (not the first one).
        Must be >= 0; γ = 0 is LRP-0.
    low, high: float or torch.Tensor
        The z^B bounds of the first convolution: the smallest and largest input value, broadcastable to the input.
        Derive them from the preprocessing with :func:`zbox_bounds` (0 and 1 for min–max to [0, 1]).
    epsilon_from_block: int
        The first conv block that gets LRP-ε instead of LRP-γ (4 in the study).
    epsilon_linears: int
        How many of the first fully connected layers get LRP-ε instead of LRP-0 (the seed README's variant uses 1 or
        2; the figure and the default use 0).
    std_epsilon: bool
        If ``True``, the ε of each ε layer is scaled by the standard deviation of that layer's output, per sample
        (Montavon et al. use ε = 0.25·std).
    zero_bias: bool
        If ``True``, every rule ignores the layers' biases (the "zero-bias" LRP variants).
    fast: bool
        Use the project's fast rules (:mod:`lrp_brain.rules`, equal to Zennit's rules to rounding) instead of Zennit's
        own :mod:`zennit.rules`.
    canonizers: list of zennit.canonizers.Canonizer, optional
        Canonizers applied before the rules. The default merges every BatchNorm into the convolution or linear
        layer before it (as Zennit's VGG canonizer does, but exactly: zennit 0.5.1's merge leaves a factor
        1/sqrt(1 + eps)) and a BatchNorm that follows an activation into the linear layer after it.
    allow_negative: bool
        Accept negative ε and γ. Only for reproducing the seed study's grid; such settings are not LRP.
    """
    def __init__(
        self,
        epsilon=0.25,
        gamma=0.1,
        low=0.,
        high=1.,
        *,
        epsilon_from_block=4,
        epsilon_linears=0,
        std_epsilon=False,
        zero_bias=False,
        fast=True,
        canonizers=None,
        allow_negative=False,
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
        if canonizers is None:
            canonizers = [MergeBatchNormIntoPrevious(), MergeBatchNormIntoNext()]
        self._hooks = {}
        super().__init__(module_map=self._module_map, canonizers=canonizers)

    def _rules(self):
        """Return the rule constructors (fast or Zennit's) bound to this composite's parameters."""
        zero_params = ['bias'] if self.zero_bias else None
        rules = fast_rules if self.fast else zennit_rules
        epsilon_value = self.epsilon if self.epsilon != 0 else STABILIZER
        if self.std_epsilon:
            epsilon_value = fast_rules.StdStabilizer(epsilon_value)
        epsilon_name = f'LRP-ε (ε={self.epsilon:g}{"·std" if self.std_epsilon else ""})'
        return {
            'first_conv': (
                f'z^B (low={_format(self.low)}, high={_format(self.high)})',
                rules.ZBox(low=self.low, high=self.high, stabilizer=STABILIZER, zero_params=zero_params),
            ),
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
            A VGG-like network (``features``, optional ``avgpool``, ``classifier``).

        Returns
        -------
        list of LayerRule
            One entry per leaf module.

        Raises
        ------
        ValueError
            If ``model`` is not VGG-like.
        """
        names = vgg_layer_names(model)
        rules = self._rules()
        first_conv = next((name for name, (_, kind, _) in names.items() if kind == 'conv'), None)
        linear_index = 0
        table = []
        for name, module in model.named_modules():
            if list(module.children()):
                continue
            layer, kind, block = names.get(name, (name, 'other', 0))
            if name == first_conv:
                group = 'first_conv'
            elif kind == 'conv':
                group = 'gamma_conv' if block < self.epsilon_from_block else 'epsilon_conv'
            elif kind == 'linear':
                linear_index += 1
                group = 'epsilon_linear' if linear_index <= self.epsilon_linears else 'linear'
            elif isinstance(module, Activation):
                group = 'activation'
            elif isinstance(module, AvgPool):
                group = 'avgpool'
            elif isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
                group = 'maxpool'
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                group = 'batchnorm'
            elif isinstance(module, (nn.Dropout, nn.Flatten, nn.Identity)):
                group = 'identity'
            else:
                group = 'uncovered'
            if group in rules:
                rule, hook = rules[group]
            else:
                rule, hook = {
                    'maxpool': 'gradient (winner takes all)',
                    'batchnorm': 'merged by a canonizer',
                    'identity': 'identity (gradient)',
                    'uncovered': 'none: not covered by the mapping',
                }[group], None
            table.append(LayerRule(name, layer, type(module).__name__, group, rule, hook))
        return table

    def register(self, module):
        """Apply the canonizers and register the rules to ``module`` (see :class:`zennit.core.Composite`)."""
        self._hooks = {entry.name: entry.hook for entry in self.layer_rules(module) if entry.hook is not None}
        super().register(module)

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
