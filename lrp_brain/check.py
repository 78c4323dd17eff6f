"""The model check behind ``lrp-brain check``: :func:`check_model` tells whether a model is safe to explain.

It runs the composite on a float64 copy of the model and reports, in a :class:`CheckReport`, whether every layer has a
rule, whether the canonizers keep the function, whether LRP gives finite relevance unchanged by in-place operations,
and how much relevance is conserved at every boundary between layer groups.
"""
import copy
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.core import RemovableHandleList

from lrp_brain.canonizers import leaf_modules
from lrp_brain.composites import VGGComposite, format_rule_table

#: Largest relative change of the output that the canonizers may cause (float64).
OUTPUT_TOLERANCE = 1e-8


@dataclass
class BoundaryRelevance:
    """The relevance arriving at one boundary between layer groups, for the explained class.

    Attributes
    ----------
    name: str
        The module whose input the boundary is (``'input'`` for the network's input, ``'output'`` for the logit).
    layer: str
        Its readable name, e.g. ``'conv2_1'``, ``'fc1'``.
    relevance_sum: float
        The sum of the relevance at the boundary.
    ratio: float
        ``relevance_sum`` divided by the target logit (1 for a conservative explanation).
    """
    name: str
    layer: str
    relevance_sum: float
    ratio: float


@dataclass
class CheckReport:
    """What :func:`check_model` found; ``print(report)`` shows it.

    Attributes
    ----------
    problems: list of str
        Reasons the model is not safe to explain (empty when it is).
    notes: list of str
        Findings that do not make the explanation wrong.
    rows: list of lrp_brain.composites.LayerRule
        Every leaf module with the rule it gets; group ``'uncovered'`` means none.
    canonizers: list of str
        The canonizers the composite applies.
    max_abs_diff, max_rel_diff: float
        The largest change of the output the canonizers cause (float64); relative to the largest output magnitude.
    restored: bool
        Whether removing the canonizers restored every module, tensor and attribute exactly.
    target: int
        The class explained for the conservation table.
    target_logit: float
    conservation: list of BoundaryRelevance
        The relevance sum at each group boundary, from the input to the output.
    """
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    rows: list = field(default_factory=list)
    canonizers: List[str] = field(default_factory=list)
    max_abs_diff: float = float('nan')
    max_rel_diff: float = float('nan')
    restored: Optional[bool] = None
    target: Optional[int] = None
    target_logit: float = float('nan')
    conservation: List[BoundaryRelevance] = field(default_factory=list)

    @property
    def ok(self):
        """``True`` when no problem was found."""
        return not self.problems

    def __str__(self):
        lines = ['rules per layer:', format_rule_table(self.rows)]
        if self.restored is not None:
            lines += ['', f'canonizers ({", ".join(self.canonizers) or "none"}): output changed by at most '
                          f'{self.max_abs_diff:.3g} (relative {self.max_rel_diff:.3g}, float64); model restored '
                          f'afterwards: {"yes" if self.restored else "no"}']
        if self.conservation:
            lines += ['', f'relevance conservation for class {self.target} (logit {self.target_logit:.6g}):',
                      f'  {"boundary":<16} {"layer":<10} {"relevance sum":>14} {"/ logit":>9}']
            lines += [f'  {row.name:<16} {row.layer:<10} {row.relevance_sum:>14.6g} {row.ratio:>9.4f}'
                      for row in self.conservation]
        if self.notes or self.problems:
            lines += ['', *(f'note: {note}' for note in self.notes)]
            lines += [f'PROBLEM: {problem}' for problem in self.problems]
        lines += ['', 'OK: safe to explain' if self.ok else f'NOT SAFE TO EXPLAIN: {len(self.problems)} problem(s)']
        return '\n'.join(lines)


def _tensor_names(module):
    return [key for key, _ in module.named_parameters(recurse=False)] + \
           [key for key, _ in module.named_buffers(recurse=False)]


def _fingerprint(module):
    """What a canonizer may change and must restore, values aside: per module name the module object, the object of
    each parameter and buffer, and the plain attributes (``eps``, ``inplace``, ``training``...)."""
    prints = {}
    for name, child in module.named_modules(remove_duplicate=False):
        tensors = _tensor_names(child)
        # Zennit 1.0.0 restores a missing bias as an instance attribute ``None``: tensors are compared by object
        plain = {key: value for key, value in vars(child).items()
                 if isinstance(value, (bool, int, float, str, tuple, type(None))) and not key.startswith('_')
                 and key not in tensors}
        prints[name] = (child, {key: getattr(child, key) for key in tensors}, plain)
    return prints


def _fingerprint_changes(before, after):
    changes = [f'{name} (removed)' for name in before if name not in after]
    changes += [f'{name} (added)' for name in after if name not in before]
    for name in before.keys() & after.keys():
        (module_before, tensors_before, plain_before), (module_after, tensors_after, plain_after) = \
            before[name], after[name]
        if module_before is not module_after:
            changes.append(f'{name} (another module object)')
            continue
        changes += [f'{name}.{key} (another tensor object)' for key in tensors_before.keys() | tensors_after.keys()
                    if tensors_before.get(key) is not tensors_after.get(key)]
        changes += [f'{name}.{key}' for key in plain_before.keys() | plain_after.keys()
                    if plain_before.get(key) != plain_after.get(key)]
    return changes


def _value_changes(network, original):
    """The parameters and buffers of ``network``, a float64 copy of ``original``, whose values differ from the
    original's (float32 to float64 is exact, so equal means equal)."""
    originals = dict(original.named_modules(remove_duplicate=False))
    changes = []
    for name, child in network.named_modules(remove_duplicate=False):
        for key in _tensor_names(child):
            value, expected = getattr(child, key), getattr(originals.get(name), key, None)
            if value is None and expected is None:
                continue
            if value is None or expected is None or value.shape != expected.shape or \
                    not torch.equal(value.detach(), expected.detach().to(value)):
                changes.append(f'{name}.{key} (values)')
    return changes


def _is_identity_batch_norm(module):
    """Whether a BatchNorm was emptied by a canonizer (mean 0, variance 1, weight 1, bias 0; ``eps`` aside)."""
    if module.running_mean is None:
        return False
    parts = [(module.running_mean, 0.), (module.running_var, 1.), (module.weight, 1.), (module.bias, 0.)]
    return all(tensor is None or bool((tensor == value).all()) for tensor, value in parts)


def _boundaries(rows):
    """The group boundaries of the rule mapping ``rows`` as ``[(module name, readable name)]`` in forward order: the
    first module of every block after the first, the average pools after the convolutional part, and every linear
    layer after the last convolution."""
    boundaries, block = [], 1
    for row in rows:
        if row.block > block or (row.block == 0 and row.group in ('avgpool', 'epsilon_linear', 'linear')):
            boundaries.append((row.name, row.layer))
            block = max(block, row.block)
    return boundaries


def _lrp_with_boundaries(model, composite, input, attr_output, boundary_names):
    """Run LRP with ``composite`` and return the input relevance and the relevance arriving at the input of each
    module in ``boundary_names``.

    The capturing hooks are placed when the forward starts, i.e. after the composite applied its canonizers (which
    may swap modules) and registered its rules, and ahead of the rules' own hooks, so each captures the relevance
    the module's rule hands down.
    """
    captured, handles = {}, RemovableHandleList()

    def capture(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                handles.append(args[0].register_hook(lambda gradient: captured.__setitem__(name, gradient)))
        return hook

    def place_hooks(root, args):
        for name in boundary_names:
            handles.append(root.get_submodule(name).register_forward_pre_hook(capture(name), prepend=True))

    handles.append(model.register_forward_pre_hook(place_hooks))
    try:
        _, relevance = Gradient(model, composite)(input.clone().requires_grad_(True), attr_output)
    finally:
        handles.remove()
    return relevance, captured


def check_model(model, example_input, target=None, **composite_kwargs):
    """Check that ``model`` can be explained with :class:`~lrp_brain.composites.VGGComposite` (``composite_kwargs``).

    Runs in float64 on a deep copy (the caller's model is not touched) and checks:

    * every leaf module gets a rule (group ``'uncovered'`` means LRP would silently pass the plain gradient);
    * no module object sits at two places or runs twice in one forward pass (a hook stores one input per module);
    * the composite's canonizers leave the function unchanged (relative change of the output at most
      :data:`OUTPUT_TOLERANCE`), merge every BatchNorm, and restore the model exactly when removed;
    * LRP runs and gives finite relevance, and in-place operations do not change it (the relevance is recomputed
      with every ``inplace`` flag off and compared);
    * the relevance conservation at every group boundary for the first input (relevance fed at the output:
      ``one_hot · logit``), printed as a ratio to the logit (biases and ε absorb some, so it is not expected to be 1).

    Parameters
    ----------
    model: torch.nn.Module
        A VGG-like classifier.
    example_input: torch.Tensor
        ``(N, C, H, W)`` inputs; the output check uses all, the relevance the first.
    target: int, optional
        The class to explain; the first input's predicted class if ``None``.
    composite_kwargs:
        Passed to :class:`~lrp_brain.composites.VGGComposite` (``epsilon``, ``gamma``, ``low``, ``high``,
        ``canonizers``, ...).

    Returns
    -------
    CheckReport
        ``report.ok`` is ``False`` with ``report.problems`` naming the reasons when the model is not safe to explain.
    """

    composite = VGGComposite(**composite_kwargs)
    report = CheckReport(canonizers=[type(canonizer).__name__ for canonizer in composite.canonizers])
    if not isinstance(example_input, torch.Tensor) or example_input.ndim != 4 or len(example_input) == 0:
        raise ValueError(f'check_model: example_input must be an (N, C, H, W) tensor with N >= 1, got '
                         f'{getattr(example_input, "shape", type(example_input).__name__)}')
    network = copy.deepcopy(model).double().eval()
    device = next((tensor.device for tensor in network.parameters()), torch.device('cpu'))
    inputs = example_input.detach().to(device=device, dtype=torch.float64)
    report.rows = composite.layer_rules(network)

    report.problems += [
        f'{row.name} ({row.module}) has no rule: LRP would pass the plain gradient through it'
        for row in report.rows if row.group == 'uncovered'
    ]
    places = {}
    for name, module in network.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    shared = {key: names for key, names in places.items() if len(names) > 1}
    report.problems += [
        f'one module object sits at {", ".join(names)}: its hooks store a single input, so its relevance is wrong'
        for names in shared.values()
    ]

    calls, handles = {}, RemovableHandleList()
    leaves = leaf_modules(network)
    for _, module in leaves:
        handles.append(module.register_forward_hook(
            lambda module, args, output: calls.__setitem__(id(module), calls.get(id(module), 0) + 1)
        ))
    try:
        with torch.no_grad():
            output = network(inputs)
    except Exception as error:  # any failure of the user's forward is the finding
        report.problems.append(f'the model fails on the example input: {type(error).__name__}: {error}')
        return report
    finally:
        handles.remove()
    report.problems += [
        f'{name} ({type(module).__name__}) runs {calls[id(module)]} times in one forward pass: its hooks store a '
        f'single input, so its relevance is wrong' for name, module in leaves
        if calls.get(id(module), 0) > 1 and id(module) not in shared
    ]
    unused = [name for name, module in leaves if id(module) not in calls]
    if unused:
        report.notes.append(f'never called in the forward pass (their rules do nothing): {", ".join(unused)}')

    _check_canonizers(network, model, inputs, output, composite, report)

    target = int(output[0].argmax()) if target is None else int(target)
    if not 0 <= target < output.shape[1]:
        raise ValueError(f'check_model: target {target} is not a class of the {output.shape[1]} outputs')
    report.target, report.target_logit = target, float(output[0, target])
    attr_output = torch.zeros_like(output[:1])
    attr_output[0, target] = output[0, target]
    _check_relevance(network, inputs[:1], attr_output, composite, _boundaries(report.rows), report)
    return report


def _check_canonizers(model, original, inputs, output, composite, report):
    """Apply the composite's canonizers alone to ``model`` (a float64 copy of ``original``): output unchanged, every
    BatchNorm merged, model restored."""
    before = _fingerprint(model)
    handles = RemovableHandleList()
    try:
        for canonizer in composite.canonizers:
            handles += canonizer.apply(model)
        with torch.no_grad():
            canonized = model(inputs)
        unmerged = [(name, module) for name, module in model.named_modules()
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _is_identity_batch_norm(module)]
    finally:
        handles.remove()
    with torch.no_grad():
        restored_output = model(inputs)
    difference = (canonized - output).abs().max().item()
    report.max_abs_diff = difference
    report.max_rel_diff = difference / max(output.abs().max().item(), torch.finfo(torch.float64).tiny)
    if not report.max_rel_diff <= OUTPUT_TOLERANCE:
        report.problems.append(
            f'the canonizers change the output by {report.max_abs_diff:.3g} (relative {report.max_rel_diff:.3g} > '
            f'{OUTPUT_TOLERANCE:g}): the explained network is not the network'
        )
    leaves = leaf_modules(model)
    neighbours = {name: (leaves[index - 1][1] if index else None, leaves[index + 1][1] if index + 1 < len(leaves)
                         else None) for index, (name, _) in enumerate(leaves)}
    for name, module in unmerged:
        before_module, after_module = (type(neighbour).__name__ if neighbour is not None else 'nothing'
                                       for neighbour in neighbours.get(name, (None, None)))
        report.problems.append(
            f'{name} ({type(module).__name__}, between {before_module} and {after_module}) is not merged by any '
            f'canonizer: LRP would pass the plain gradient through it'
        )
    changes = _fingerprint_changes(before, _fingerprint(model)) + _value_changes(model, original)
    report.restored = not changes and torch.equal(restored_output, output)
    if not report.restored:
        where = ', '.join(changes[:8]) + (f' and {len(changes) - 8} more' if len(changes) > 8 else '')
        report.problems.append(
            f'removing the canonizers does not restore the model: {where or "the output differs"}'
        )


def _check_relevance(model, input, attr_output, composite, boundaries, report):
    """LRP on one input: finite, unaffected by in-place operations, and its conservation per group boundary."""
    names = [name for name, _ in boundaries]
    in_place = [module for module in model.modules() if getattr(module, 'inplace', False) is True]
    try:
        relevance, captured = _lrp_with_boundaries(model, composite, input, attr_output, names)
    except RuntimeError as error:
        hint = f' (the model has {len(in_place)} in-place modules: try inplace=False)' if in_place else ''
        report.problems.append(f'LRP fails on this model: {error}{hint}')
        return

    if in_place:
        for module in in_place:
            module.inplace = False
        try:
            reference, _ = _lrp_with_boundaries(model, composite, input, attr_output, names)
        finally:
            for module in in_place:
                module.inplace = True
        difference = (relevance - reference).abs().max().item()
        difference /= max(reference.abs().max().item(), torch.finfo(torch.float64).tiny)
        kinds = ', '.join(sorted({type(module).__name__ for module in in_place}))
        if difference > OUTPUT_TOLERANCE:
            report.problems.append(f'in-place operations change the relevance (relative {difference:.3g}): set '
                                   f'inplace=False on the {len(in_place)} in-place modules ({kinds})')
        else:
            report.notes.append(f'{len(in_place)} in-place modules ({kinds}): the relevance is the same with '
                                f'inplace=False (relative difference {difference:.1g})')

    logit = report.target_logit
    for name, layer, values in [('input', 'input', relevance)] + [
            (name, layer, captured.get(name)) for name, layer in boundaries]:
        if values is None:
            report.notes.append(f'no relevance reached {name} ({layer})')
            continue
        if not torch.isfinite(values).all():
            report.problems.append(f'the relevance at {name} ({layer}) is not finite')
        total = values.sum().item()
        report.conservation.append(BoundaryRelevance(name, layer, total, total / logit if logit else float('nan')))
    report.conservation.append(BoundaryRelevance('output', 'logit', logit, 1. if logit else float('nan')))


def probe_input(size, low=0., high=1., seed=0, channels=3):
    """A reproducible input to check a model on: ``(1, channels, size, size)`` float64, uniform between the z^B bounds
    ``low`` and ``high`` (numbers or tensors broadcastable to the input), seeded by ``seed``; ``size`` must be a
    positive integer (:class:`ValueError` otherwise)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f'the probe input size must be a positive integer, got {size!r}')
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(1, channels, size, size, generator=generator, dtype=torch.float64)
    low, high = (torch.as_tensor(bound, dtype=torch.float64) for bound in (low, high))
    return low + (high - low) * uniform
