"""Canonizers that fold BatchNorm exactly.

LRP rules are written for an affine layer followed by an activation. A BatchNorm (in evaluation mode the affine map
``BN(x) = s·x + t`` per channel, ``s = γ/√(var + eps)``, ``t = β - mean·s``) has no rule of its own: it must be
folded into a neighbouring convolution or linear layer first, which leaves the function unchanged and gives the
rules the weights the network really uses.

* :class:`MergeBatchNormIntoPrevious` folds a BatchNorm into the convolution or linear layer right before it
  (``W' = diag(s)·W``, ``b' = s·b + t``), like Zennit's ``SequentialMergeBatchNorm`` — but exactly: Zennit 0.5.1
  leaves the emptied BatchNorm dividing by ``√(1 + eps)``, a relative change of ~5e-6 per BatchNorm.
* :class:`MergeBatchNormIntoNext` folds a BatchNorm that follows an activation (``Linear → ReLU → BatchNorm1d →
  Linear``, as in many classifier heads converted from Keras) into the layer after it
  (``W' = W·diag(s)``, ``b' = b + W·t``).

Both work by replacement: the BatchNorm is swapped for an :class:`torch.nn.Identity` and the layer for a folded copy;
``remove()`` puts the original module objects back, untouched. They therefore combine with Zennit's in-place
canonizers in any order and under Zennit 0.5.1 and 1.0.0. Forward hooks a user put on a swapped module do not run
while the canonizer is applied.

The model check (:func:`lrp_brain.check.check_model`) lives in :mod:`lrp_brain.check`.
"""
import weakref

import torch
from torch import nn
from zennit.canonizers import Canonizer
from zennit.types import Linear as ZennitLinear

#: Layers a BatchNorm is folded into; exact types, since a subclass may compute something else.
FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Modules that may sit between a BatchNorm and the layer after it (identities in evaluation mode).
TRANSPARENT = (nn.Identity, nn.modules.dropout._DropoutNd)

def batch_norm_affine(batch_norm):
    """Return ``(scale, shift)`` with ``BatchNorm(x) = scale·x + shift`` per channel, in evaluation mode.

    ``scale = weight / √(running_var + eps)``, ``shift = bias - running_mean·scale`` (weight 1 and bias 0 without
    affine parameters).
    """
    scale = 1. / torch.sqrt(batch_norm.running_var + batch_norm.eps)
    if batch_norm.weight is not None:
        scale = batch_norm.weight * scale
    shift = -batch_norm.running_mean * scale
    if batch_norm.bias is not None:
        shift = shift + batch_norm.bias
    return scale.detach(), shift.detach()


def _with_parameters(layer, weight, bias):
    """A new layer of the same type and hyper-parameters as ``layer`` holding ``weight`` and ``bias``.

    The copy is built on the meta device (no initialisation work) and then given the new parameters, so the original
    is never touched, whatever other canonizers did to its attributes.
    """
    if isinstance(layer, nn.Linear):
        folded = nn.Linear(layer.in_features, layer.out_features, device='meta')
    else:
        folded = type(layer)(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode, device='meta',
        )
    folded.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    folded.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    folded.train(layer.training)
    return folded


#: For every module a fold put in place, the module it replaced (weak keys: nothing is kept alive by this).
_REPLACED = weakref.WeakKeyDictionary()


def _replaces(module, replacement):
    """Whether ``module`` is ``replacement`` or was put in its stead by later folds (follows :data:`_REPLACED`)."""
    while module is not None:
        if module is replacement:
            return True
        module = _REPLACED.get(module)
    return False


def leaf_modules(root_module):
    """``[(name, module)]`` of the leaf modules in registration order (Zennit's ``collect_leaves`` order)."""
    return [(name, module) for name, module in root_module.named_modules() if not list(module.children())]


def _batch_norm_with_statistics(module):
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


class _FoldBatchNorm(Canonizer):
    """Fold one BatchNorm into a neighbouring layer by swapping modules; subclasses say which pairs and how.

    Subclasses implement ``pairs(root_module)``, yielding ``(batch_norm_name, layer_name, repeat)``, and
    ``fold(batch_norm, layer, repeat)``, returning the folded ``(weight, bias)``.
    """
    def __init__(self):
        super().__init__()
        self.swaps = []

    def apply(self, root_module):
        """Fold every pair ``pairs(root_module)`` finds; return one applied instance per pair."""
        instances = []
        for batch_norm_name, layer_name, repeat in list(self.pairs(root_module)):
            instance = self.copy()
            instance.register(root_module, batch_norm_name, layer_name, repeat)
            instances.append(instance)
        return instances

    def register(self, root_module, batch_norm_name, layer_name, repeat):
        """Swap the BatchNorm for an identity and the layer for its folded copy (new tensors, computed without
        gradient tracking)."""
        batch_norm, layer = root_module.get_submodule(batch_norm_name), root_module.get_submodule(layer_name)
        with torch.no_grad():
            weight, bias = self.fold(batch_norm, layer, repeat)
        self._swap(root_module, batch_norm_name, nn.Identity())
        self._swap(root_module, layer_name, _with_parameters(layer, weight, bias))

    def _swap(self, root_module, name, replacement):
        parent_name, _, child_name = name.rpartition('.')
        parent = root_module.get_submodule(parent_name)
        original = getattr(parent, child_name)
        _REPLACED[replacement] = original
        self.swaps.append((parent, child_name, original, replacement))
        setattr(parent, child_name, replacement)

    def remove(self):
        """Put the original modules back.

        A place is restored while it holds this canonizer's replacement or a module a later canonizer put in its
        stead (removal in application order, as Zennit does); a place that already holds an older module (a
        canonizer applied earlier was removed first and put back its original) is left as it is.
        """
        for parent, child_name, original, replacement in reversed(self.swaps):
            if _replaces(getattr(parent, child_name), replacement):
                setattr(parent, child_name, original)
        self.swaps = []


class MergeBatchNormIntoPrevious(_FoldBatchNorm):
    """Fold every BatchNorm that directly follows a convolution or linear layer (leaf order, as Zennit's
    ``SequentialMergeBatchNorm``) into that layer: ``W' = diag(s)·W``, ``b' = s·b + t``; exact in float64."""
    def pairs(self, root_module):
        leaves = leaf_modules(root_module)
        for (layer_name, layer), (name, batch_norm) in zip(leaves, leaves[1:]):
            channels = layer.out_features if isinstance(layer, nn.Linear) else getattr(layer, 'out_channels', None)
            if (type(layer) in FOLDABLE_LAYERS and _batch_norm_with_statistics(batch_norm)
                    and channels == batch_norm.num_features):
                yield name, layer_name, 1

    @staticmethod
    def fold(batch_norm, layer, repeat):
        scale, shift = batch_norm_affine(batch_norm)
        scale, shift = scale.to(layer.weight), shift.to(layer.weight)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        # BN(Wx + b) = s·(Wx + b) + t: scale every output channel (dimension 0 of the weight)
        weight = layer.weight * scale.reshape(-1, *([1] * (layer.weight.ndim - 1)))
        return weight, scale * bias + shift


class MergeBatchNormIntoNext(_FoldBatchNorm):
    """Fold a BatchNorm that does not follow a convolution or linear layer into the layer after it.

    In every :class:`torch.nn.Sequential`, a BatchNorm whose previous leaf module is not a Zennit linear layer (an
    activation, say, or nothing) and that is followed, possibly after dropout, identities and a flattening, by a
    ``Linear`` or ``Conv1d/2d/3d`` is folded into that layer: ``W' = W·diag(s)``, ``b' = b + W·t``. After a
    flattening the channel factors repeat over the positions of a channel (``Linear.in_features = C·k``).

    A convolution with zero padding of non-zero width is left alone: the padded zeros would need to be ``-t/s`` in
    the folded network, so no folded convolution computes the same function at the border.
    :func:`lrp_brain.check.check_model` reports such a BatchNorm as unmerged.
    """
    def pairs(self, root_module):
        leaves = leaf_modules(root_module)
        previous = {name: module for (_, module), (name, _) in zip(leaves, leaves[1:])}
        for prefix, container in root_module.named_modules():
            if not isinstance(container, nn.Sequential):
                continue
            children = list(container.named_children())
            for index, (child_name, batch_norm) in enumerate(children):
                name = f'{prefix}.{child_name}' if prefix else child_name
                if not _batch_norm_with_statistics(batch_norm) or isinstance(previous.get(name), ZennitLinear):
                    continue
                flattened = False
                for next_name, following in children[index + 1:]:
                    if isinstance(following, nn.Flatten) and not flattened and following.start_dim == 1 \
                            and following.end_dim == -1:
                        flattened = True
                    elif not isinstance(following, TRANSPARENT):
                        break
                else:
                    continue
                repeat = self._repeat(batch_norm, following, flattened)
                if repeat is not None:
                    yield name, f'{prefix}.{next_name}' if prefix else next_name, repeat

    @staticmethod
    def _repeat(batch_norm, layer, flattened):
        """How often each channel factor repeats along the layer's input, or ``None`` if the fold is not exact."""
        channels = batch_norm.num_features
        if type(layer) is nn.Linear:
            if layer.in_features == channels and not flattened:
                return 1
            if flattened and layer.in_features % channels == 0:
                return layer.in_features // channels
            return None
        if type(layer) in FOLDABLE_LAYERS and not flattened and layer.in_channels == channels:
            if isinstance(layer.padding, str):
                padded = layer.padding == 'same' and any(size > 1 for size in layer.kernel_size)
            else:
                padded = any(width != 0 for width in layer.padding)
            return None if padded and layer.padding_mode == 'zeros' else 1
        return None

    @staticmethod
    def fold(batch_norm, layer, repeat):
        scale, shift = batch_norm_affine(batch_norm)
        scale, shift = scale.to(layer.weight), shift.to(layer.weight)
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0]).to(layer.weight)
        if isinstance(layer, nn.Linear):
            scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
            # W(s·x + t) + b = (W·diag(s))x + (b + W·t)
            return layer.weight * scale, bias + layer.weight @ shift
        # a convolution's weight is (out, in / groups, *kernel); weight [o, i] reads input channel g(o)·in/g + i
        groups, (out_channels, group_channels) = layer.groups, layer.weight.shape[:2]
        per_weight = [
            factor.reshape(groups, 1, group_channels).expand(groups, out_channels // groups, group_channels)
            .reshape(out_channels, group_channels, *([1] * (layer.weight.ndim - 2)))
            for factor in (scale, shift)
        ]
        # without zero padding every output sees a full window of (s·x + t): the shift adds Σ W·t to the bias
        return layer.weight * per_weight[0], bias + (layer.weight * per_weight[1]).flatten(1).sum(1)
