"""Reading a VGG-family ONNX graph as torch modules: convolutions, ReLUs and max-pools, an average pool, and a
classifier head of Linear, ReLU, BatchNorm1d and Dropout layers, every ONNX-only form folded away.

The graph must be a chain from its one input to its one output (shape computations feeding a ``Reshape`` aside).
Its nodes are read in order, as exported by tf2onnx from Keras and by ``torch.onnx.export`` from torchvision-style
models:

* ``Transpose`` moves axes; the converted network always takes NCHW input. A graph taking NHWC input (Keras) starts
  with ``Transpose(perm=[0, 3, 1, 2])``, which is folded away: :attr:`ConvertedGraph.layout` records ``'NHWC'``.
* ``Conv``, ``Relu``, ``MaxPool`` become ``Conv2d``, ``ReLU``, ``MaxPool2d``.
* ``AveragePool`` (kernel = stride, no padding), ``GlobalAveragePool`` and ``ReduceMean`` over the two spatial axes
  become the average pool (``AdaptiveAvgPool2d``); without one, the pool is the identity
  ``AdaptiveAvgPool2d`` of the last feature map's size.
* ``Flatten``, or a ``Reshape`` to ``(N, features)``, flattens. After a ``Transpose`` to NHWC the graph flattens in
  ``(h, w, c)`` order, torch in ``(c, h, w)`` order: the permutation is folded into the first linear layer's columns
  (and into any per-feature scale or shift before it).
* ``Gemm`` (``α·A·B' + β·C``) and ``MatMul`` with a constant matrix become ``Linear``.
* ``BatchNormalization`` and its decomposition into ``Mul``/``Add`` (or ``Sub``/``Div``) by constants, i.e. an affine
  map ``x ↦ s·x + t`` per channel: folded into the convolution or linear layer right before it
  (``W' = diag(s)·W``, ``b' = s·b + t``); in the head after an activation it stays a ``BatchNorm1d``
  (statistics kept; a ``Mul``/``Add`` pair becomes one with mean 0, variance 1, ``eps = 0``, weight ``s``, bias
  ``t``), which the project's canonizers fold when explaining.
* ``Dropout`` becomes ``Dropout`` in the head and is dropped in the features (an identity in evaluation);
  ``Identity`` is dropped.
* A final ``Softmax`` is dropped (LRP explains the logits); :attr:`ConvertedGraph.softmax` names it.

Any other node raises :class:`GraphError` naming the node, its op and where it sits.
"""
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

#: The ops :func:`convert` reads, for error messages.
SUPPORTED_OPS = (
    'Transpose', 'Conv', 'Relu', 'MaxPool', 'AveragePool', 'GlobalAveragePool', 'ReduceMean', 'Flatten', 'Reshape',
    'Gemm', 'MatMul', 'Add', 'Sub', 'Mul', 'Div', 'BatchNormalization', 'Dropout', 'Identity', 'Softmax',
)

#: Ops whose output describes the shape of a tensor, not its values: they may read the data path.
SHAPE_OPS = ('Shape', 'Size')

#: Torch's axis order; ``axes[i]`` of the converter is the torch axis held by the graph's axis ``i``.
NCHW = (0, 1, 2, 3)

#: The input transposes a graph may start with: the graph's input layout for each.
INPUT_LAYOUTS = {NCHW: 'NCHW', (0, 3, 1, 2): 'NHWC'}


class GraphError(ValueError):
    """An ONNX graph that is not a VGG-family chain this converter reads; the message names the node, its op and
    where it sits."""


@dataclass
class ConvertedGraph:
    """A graph read as torch modules (float32, evaluation mode), in torchvision's VGG layout.

    Attributes
    ----------
    features: list of torch.nn.Module
        Conv2d, ReLU and MaxPool2d, in order (``model.features``).
    feature_nodes: list of str
        The node each module of ``features`` came from.
    pool_size: tuple of int
        The output size of the average pool (``AdaptiveAvgPool2d(pool_size)``).
    classifier: list of torch.nn.Module
        Linear, ReLU, BatchNorm1d and Dropout, in order (``model.classifier``, after flattening).
    input_name: str
        The graph's input.
    input_shape: tuple
        Its dimensions in the graph's layout, ``None`` for a symbolic one (the batch).
    layout: str
        ``'NCHW'`` or ``'NHWC'``: how the graph takes its input. The converted network takes NCHW.
    input_size: int
        The side of the square input image.
    logits: str
        The graph tensor the converted network computes: the Softmax's input, or the graph's output.
    softmax: str or None
        The name of the final Softmax node that was dropped, ``None`` if there was none.
    """
    features: list = field(default_factory=list)
    feature_nodes: list = field(default_factory=list)
    pool_size: tuple = None
    classifier: list = field(default_factory=list)
    input_name: str = ''
    input_shape: tuple = ()
    layout: str = 'NCHW'
    input_size: int = 0
    logits: str = ''
    softmax: str = None


def _pair(values, what, node):
    """``(a, b)`` from a 2-element attribute, or a GraphError."""
    values = tuple(int(value) for value in values)
    if len(values) != 2:
        raise GraphError(f'{node}: {what} {list(values)} is not 2-dimensional')
    return values


def _square(pair):
    """An int for a square pair (as torchvision writes its max-pools), else the pair."""
    return pair[0] if pair[0] == pair[1] else pair


def _symmetric_padding(pads, node):
    """``(top, left)`` from ONNX ``pads = [top, left, bottom, right]``; torch pads both sides alike."""
    pads = tuple(int(value) for value in pads)
    if len(pads) != 4 or pads[:2] != pads[2:]:
        raise GraphError(f'{node}: padding {list(pads)} (top, left, bottom, right) is not symmetric, which torch '
                         f'convolutions and pools cannot hold')
    return pads[:2]


def _padding(attributes, kernel, strides, dilations, size, node):
    """The symmetric padding of a Conv or pool, from ``pads`` or ``auto_pad``."""
    auto_pad = attributes.get('auto_pad', b'NOTSET')
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ('NOTSET', ''):
        return _symmetric_padding(attributes.get('pads', [0, 0, 0, 0]), node)
    if auto_pad == 'VALID':
        return 0, 0
    totals = []
    for extent, k, stride, dilation in zip(size, kernel, strides, dilations):
        output = -(-extent // stride)
        totals.append(max((output - 1) * stride + dilation * (k - 1) + 1 - extent, 0))
    if any(total % 2 for total in totals):
        raise GraphError(f'{node}: auto_pad {auto_pad} pads {totals} pixels, unevenly on the two sides, which torch '
                         f'cannot hold')
    return tuple(total // 2 for total in totals)


def _output_extent(extent, kernel, stride, padding, dilation, ceil_mode=False):
    span = extent + 2 * padding - dilation * (kernel - 1) - 1
    return (-(-span // stride) if ceil_mode else span // stride) + 1


class _Converter:
    """Walks the chain of an ONNX graph and collects the torch modules (see the module docstring)."""

    def __init__(self, model):
        self.graph = model.graph
        self.constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in self.graph.initializer}
        self.model = model
        self.result = ConvertedGraph()
        self.stage = 'input'        # 'input' (before the first convolution), 'features', 'pooled', 'head'
        self.axes = NCHW            # the torch axis each graph axis holds (4-d stages)
        self.channels = self.height = self.width = 0
        self.features_count = 0     # the head's width
        self.order = None           # graph feature j holds torch feature order[j], until the first linear layer
        self.block = 1
        self.previous = None
        self.node_label = ''
        self.input_info = self.input_dims = None

    # --- reading the graph ---------------------------------------------------------------------------------------

    def constant(self, name, node):
        """The value of a constant input (an initializer, a ``Constant`` or the ``Identity`` of a constant)."""
        if name in self.constants:
            return self.constants[name]
        raise GraphError(f'{node}: input {name!r} is not a constant (an initializer or a Constant node), so it '
                         f'cannot be a weight')

    def read_constant_nodes(self, nodes):
        """Evaluate the ``Constant`` nodes and the ``Identity`` of constants; return the other nodes."""
        rest = []
        for node in nodes:
            if node.op_type == 'Constant':
                attribute = node.attribute[0]
                value = onnx.helper.get_attribute_value(attribute)
                self.constants[node.output[0]] = (
                    numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
                )
            elif node.op_type == 'Identity' and node.input[0] in self.constants:
                self.constants[node.output[0]] = self.constants[node.input[0]]
            else:
                rest.append(node)
        return rest

    def where(self):
        """Where the walk is, in words, for error messages."""
        after = f', after node {self.previous!r}' if self.previous else ''
        if self.stage == 'input':
            return 'before the first convolution' + after
        if self.stage in ('features', 'pooled'):
            return f'in conv block {self.block} of the features' + after
        return 'in the classifier head' + after

    def unsupported(self, node, reason=None):
        reason = reason or f'not supported; the ops read are {", ".join(SUPPORTED_OPS)}'
        return GraphError(f'{self.node_label} ({self.where()}): {reason}')

    def chain(self, nodes, input_name):
        """The nodes on the data path from ``input_name``, in order, each with the index of its data input."""
        data, path = {input_name}, []
        for node in nodes:
            data_inputs = [index for index, name in enumerate(node.input)
                           if name in data and not (node.op_type == 'Reshape' and index == 1)]
            if not data_inputs:
                continue
            label = f'node {node.name or node.output[0]!r} (op {node.op_type})'
            if node.op_type in SHAPE_OPS:
                continue
            if len(data_inputs) > 1:
                raise GraphError(f'{label}: combines {len(data_inputs)} computed tensors '
                                 f'({", ".join(node.input[index] for index in data_inputs)}); a VGG is a chain')
            source = node.input[data_inputs[0]]
            if path and source != path[-1][0].output[0]:
                raise GraphError(f'{label}: reads {source!r}, not the output of node '
                                 f'{path[-1][0].name or path[-1][0].output[0]!r} before it: the graph branches, and '
                                 f'a VGG is a chain')
            path.append((node, data_inputs[0]))
            data.update(name for name in node.output[:1] if name)
            used = [name for name in node.output[1:] if name and self.consumed(name, nodes)]
            if used:
                raise GraphError(f'{label}: its extra output {used[0]!r} is used')
        return path

    def consumed(self, name, nodes):
        outputs = {output.name for output in self.graph.output}
        return name in outputs or any(name in node.input for node in nodes)

    # --- the walk -------------------------------------------------------------------------------------------------

    def convert(self):
        inputs = [item for item in self.graph.input if item.name not in self.constants]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise GraphError(f'the graph has {len(inputs)} inputs and {len(self.graph.output)} outputs; a classifier '
                             f'has one of each')
        self.read_input(inputs[0])
        nodes = self.read_constant_nodes(list(self.graph.node))
        path = self.chain(nodes, inputs[0].name)
        output = self.graph.output[0].name
        if not path or path[-1][0].output[0] != output:
            raise GraphError(f'the graph output {output!r} is not computed from the input {inputs[0].name!r} '
                             f'by a chain of nodes')
        self.result.logits = output
        for position, (node, data_index) in enumerate(path):
            self.node_label = f'node {node.name or node.output[0]!r} (op {node.op_type}, {position + 1} of {len(path)})'
            handler = getattr(self, f'op_{node.op_type}', None)
            if handler is None:
                raise self.unsupported(node)
            attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
            handler(node, data_index, attributes, last=position == len(path) - 1)
            self.previous = node.name or node.output[0]
        if self.stage != 'head' or not any(isinstance(module, nn.Linear) for module in self.result.classifier):
            raise GraphError(f'the graph ends {self.where()} without a fully connected layer: not a VGG classifier')
        return self.result

    def read_input(self, value_info):
        dims = value_info.type.tensor_type.shape.dim
        shape = tuple(dim.dim_value if dim.HasField('dim_value') else None for dim in dims)
        self.input_info = value_info
        self.result.input_name, self.result.input_shape = value_info.name, shape
        if len(shape) != 4 or None in shape[1:]:
            raise GraphError(f'input {value_info.name!r} has shape {self.dims_text(dims)}; an image classifier '
                             f'takes (N, C, H, W) or (N, H, W, C) with fixed C, H, W')
        self.input_dims = shape

    @staticmethod
    def dims_text(dims):
        return '(' + ', '.join(str(dim.dim_value) if dim.HasField('dim_value') else dim.dim_param or '?'
                               for dim in dims) + ')'

    def append(self, module, node):
        if self.stage in ('input', 'features', 'pooled'):
            self.result.features.append(module)
            self.result.feature_nodes.append(node.name or node.output[0])
        else:
            self.result.classifier.append(module)

    def require_stage(self, node, *stages):
        if self.stage not in stages:
            places = {
                'input': 'before the first convolution',
                'features': 'among the convolutions (before the average pool and the flattening)',
                'head': 'in the classifier head (after the flattening)',
            }
            raise self.unsupported(node, f'a {node.op_type} belongs {" or ".join(places[stage] for stage in stages)}')

    def require_nchw(self, node):
        if self.axes != NCHW:
            raise self.unsupported(node, f'its input is not in NCHW order (the graph axes hold torch axes '
                                         f'{list(self.axes)})')

    def layers(self):
        return self.result.features if self.stage != 'head' else self.result.classifier

    # --- ops ------------------------------------------------------------------------------------------------------

    def op_Identity(self, node, data_index, attributes, last):
        pass

    def op_Dropout(self, node, data_index, attributes, last):
        if len(node.input) > 2 and node.input[2] and bool(self.constant(node.input[2], self.node_label)):
            raise self.unsupported(node, 'a Dropout in training mode')
        if self.stage == 'head':
            ratio = float(self.constant(node.input[1], self.node_label)) if len(node.input) > 1 and node.input[1] \
                else float(attributes.get('ratio', .5))
            self.append(nn.Dropout(ratio), node)

    def op_Transpose(self, node, data_index, attributes, last):
        rank = 2 if self.stage == 'head' else 4
        perm = tuple(int(axis) for axis in attributes.get('perm', range(rank)[::-1]))
        if rank == 2:
            if perm != (0, 1):
                raise self.unsupported(node, f'transposes the batch axis of the head (perm {list(perm)})')
            return
        if len(perm) != 4 or perm[0] != 0:
            raise self.unsupported(node, f'perm {list(perm)} moves the batch axis')
        self.axes = tuple(self.axes[axis] for axis in perm)

    def op_Conv(self, node, data_index, attributes, last):
        if self.stage == 'input':
            self.start_features(node)
        self.require_stage(node, 'features')
        self.require_nchw(node)
        weight = self.constant(node.input[1], self.node_label).astype(np.float64)
        bias = (self.constant(node.input[2], self.node_label).astype(np.float64) if len(node.input) > 2
                and node.input[2] else np.zeros(weight.shape[0]))
        if weight.ndim != 4:
            raise self.unsupported(node, f'a {weight.ndim - 2}-d convolution')
        groups = int(attributes.get('group', 1))
        if weight.shape[1] * groups != self.channels:
            raise self.unsupported(node, f'its weight {weight.shape} does not fit {self.channels} input channels')
        kernel = _pair(attributes.get('kernel_shape', weight.shape[2:]), 'kernel', self.node_label)
        strides = _pair(attributes.get('strides', (1, 1)), 'strides', self.node_label)
        dilations = _pair(attributes.get('dilations', (1, 1)), 'dilations', self.node_label)
        padding = _padding(attributes, kernel, strides, dilations, (self.height, self.width), self.node_label)
        conv = nn.Conv2d(self.channels, weight.shape[0], kernel, stride=strides, padding=padding,
                         dilation=dilations, groups=groups)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight))
            conv.bias.copy_(torch.from_numpy(bias))
        self.append(conv, node)
        self.channels = weight.shape[0]
        self.height, self.width = (_output_extent(extent, *parameters) for extent, *parameters in
                                   zip((self.height, self.width), kernel, strides, padding, dilations))

    def start_features(self, node):
        """The first convolution: the transposes before it say the graph's input layout."""
        layout = INPUT_LAYOUTS.get(self.axes)
        if layout is None:
            raise self.unsupported(node, f'the transposes before it (axes {list(self.axes)}) make neither NCHW nor '
                                         f'NHWC input into NCHW')
        # before the first convolution, axis i of the computed tensor is axis axes[i] of the graph's input; the
        # convolution reads its input as NCHW
        _, self.channels, self.height, self.width = (self.input_dims[axis] for axis in self.axes)
        if self.channels != 3 or self.height != self.width:
            raise GraphError(
                f'input {self.result.input_name!r} ({layout}) has {self.channels} channels of {self.height}×'
                f'{self.width} pixels; the project feeds square 3-channel images'
            )
        self.result.layout, self.result.input_size = layout, self.height
        self.stage, self.axes = 'features', NCHW

    def op_Relu(self, node, data_index, attributes, last):
        self.require_stage(node, 'features', 'head')
        self.append(nn.ReLU(inplace=True), node)

    def op_MaxPool(self, node, data_index, attributes, last):
        self.require_stage(node, 'features')
        self.require_nchw(node)
        if len(node.output) > 1 and node.output[1]:
            raise self.unsupported(node, 'a MaxPool whose indices are used')
        kernel = _pair(attributes['kernel_shape'], 'kernel', self.node_label)
        strides = _pair(attributes.get('strides', (1, 1)), 'strides', self.node_label)
        dilations = _pair(attributes.get('dilations', (1, 1)), 'dilations', self.node_label)
        padding = _padding(attributes, kernel, strides, dilations, (self.height, self.width), self.node_label)
        ceil_mode = bool(attributes.get('ceil_mode', 0))
        self.append(nn.MaxPool2d(_square(kernel), stride=_square(strides), padding=_square(padding),
                                 dilation=_square(dilations), ceil_mode=ceil_mode), node)
        self.height, self.width = (_output_extent(extent, *parameters, ceil_mode) for extent, *parameters in
                                   zip((self.height, self.width), kernel, strides, padding, dilations))
        self.block += 1

    def set_pool(self, node, size):
        self.require_stage(node, 'features')
        self.result.pool_size = size
        self.height, self.width = size
        self.stage = 'pooled'

    def op_GlobalAveragePool(self, node, data_index, attributes, last):
        self.require_nchw(node)
        self.set_pool(node, (1, 1))

    def op_AveragePool(self, node, data_index, attributes, last):
        self.require_nchw(node)
        kernel = _pair(attributes['kernel_shape'], 'kernel', self.node_label)
        strides = _pair(attributes.get('strides', (1, 1)), 'strides', self.node_label)
        padding = _symmetric_padding(attributes.get('pads', [0, 0, 0, 0]), self.node_label)
        if (kernel != strides or padding != (0, 0) or attributes.get('auto_pad', b'NOTSET') not in (b'NOTSET', b'VALID')
                or self.height % kernel[0] or self.width % kernel[1]):
            raise self.unsupported(node, f'an average pool with kernel {list(kernel)}, strides {list(strides)}, '
                                         f'padding {list(padding)} on {self.height}×{self.width} maps is not an '
                                         f'adaptive average pool')
        self.set_pool(node, (self.height // kernel[0], self.width // kernel[1]))

    def op_ReduceMean(self, node, data_index, attributes, last):
        axes = attributes.get('axes')
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.constant(node.input[1], self.node_label)
        spatial = sorted((self.axes.index(2), self.axes.index(3)))
        if axes is None or sorted(int(axis) % 4 for axis in np.ravel(axes)) != spatial:
            raise self.unsupported(node, f'a mean over axes {None if axes is None else list(np.ravel(axes))}, not '
                                         f'over the spatial axes {spatial}')
        self.set_pool(node, (1, 1))
        if not attributes.get('keepdims', 1):
            self.start_head(np.arange(self.channels))

    def flatten(self, node):
        """Flatten the 4-d maps in the graph's axis order; the permutation to torch's (c, h, w) order is kept for the
        first linear layer."""
        if self.stage == 'head':
            return
        self.require_stage(node, 'features', 'pooled')
        if self.result.pool_size is None:
            self.result.pool_size = (self.height, self.width)
        torch_index = np.arange(self.channels * self.height * self.width).reshape(self.channels, self.height,
                                                                                  self.width)
        self.start_head(torch_index.transpose([axis - 1 for axis in self.axes[1:]]).reshape(-1))

    def start_head(self, order):
        self.stage, self.order, self.features_count = 'head', order, len(order)

    def op_Flatten(self, node, data_index, attributes, last):
        if int(attributes.get('axis', 1)) != 1:
            raise self.unsupported(node, f'Flatten at axis {attributes["axis"]}, not 1')
        self.flatten(node)

    def op_Reshape(self, node, data_index, attributes, last):
        size = self.features_count if self.stage == 'head' else self.channels * self.height * self.width
        if node.input[1] in self.constants:
            target = [int(value) for value in self.constants[node.input[1]]]
            # a batch of 1 written out is a flattening only where the graph takes one image at a time
            flat = len(target) == 2 and target[1] in (size, -1) and target[0] in (0, -1, self.result.input_shape[0])
        else:  # a target computed from the tensor's Shape (torch's x.view(x.size(0), -1)): ask ONNX shape inference
            inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True).graph.value_info
            dims = next((info for info in inferred if info.name == node.output[0]), None)
            dims = dims.type.tensor_type.shape.dim if dims is not None else []
            target = self.dims_text(dims) if dims else 'unknown'
            batch = self.input_info.type.tensor_type.shape.dim[0]
            flat = len(dims) == 2 and (dims[0] == batch or dims[1].dim_value == size)
        if not flat:
            raise self.unsupported(node, f'a Reshape to {target}, not a flattening to (N, {size})')
        self.flatten(node)

    def linear(self, node, weight, bias):
        """Append ``Linear`` with ``weight`` (out, in) in the graph's feature order and ``bias``."""
        self.require_stage(node, 'head')
        if weight.shape[1] != self.features_count:
            raise self.unsupported(node, f'its weight reads {weight.shape[1]} features of the '
                                         f'{self.features_count} computed')
        if bias.size not in (1, weight.shape[0]):
            raise self.unsupported(node, f'its bias of shape {list(bias.shape)} is not one value per output')
        if self.order is not None:
            reordered = np.empty_like(weight)
            reordered[:, self.order] = weight
            weight, self.order = reordered, None
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            layer.bias.copy_(torch.from_numpy(np.broadcast_to(bias, weight.shape[:1]).copy()))
        self.append(layer, node)
        self.features_count = weight.shape[0]

    def op_Gemm(self, node, data_index, attributes, last):
        if data_index != 0 or attributes.get('transA', 0):
            raise self.unsupported(node, 'a Gemm whose computed input is not its first, untransposed operand')
        matrix = self.constant(node.input[1], self.node_label).astype(np.float64)
        weight = float(attributes.get('alpha', 1.)) * (matrix if attributes.get('transB', 0) else matrix.T)
        bias = (float(attributes.get('beta', 1.)) * self.constant(node.input[2], self.node_label).astype(np.float64)
                .reshape(-1) if len(node.input) > 2 and node.input[2] else np.zeros(1))
        self.linear(node, weight, bias)

    def op_MatMul(self, node, data_index, attributes, last):
        if data_index != 0:
            raise self.unsupported(node, 'a MatMul whose computed input is its second operand')
        matrix = self.constant(node.input[1], self.node_label).astype(np.float64)
        if matrix.ndim != 2:
            raise self.unsupported(node, f'a MatMul by a {matrix.ndim}-d constant')
        self.linear(node, matrix.T, np.zeros(1))

    def per_channel(self, node, value, broadcast=True):
        """A constant as one value per channel (per feature in the head), in torch's order: broadcast against the
        computed tensor (``broadcast``), or already one value per channel of axis 1 (BatchNormalization's)."""
        if self.stage == 'input':
            raise self.unsupported(node, 'the graph scales its input (a preprocessing layer such as Rescaling or '
                                         'Normalization): export the model without it and give the range it '
                                         'expects as the value range (and mean, std)')
        if self.stage == 'pooled':
            raise self.unsupported(node, 'a per-channel scale or shift after the average pool')
        value = np.asarray(value, dtype=np.float64)
        count = self.features_count if self.stage == 'head' else self.channels
        rank, channel_axis = (2, 1) if self.stage == 'head' else (4, self.axes.index(1))
        if not broadcast:
            rank, channel_axis = 1, 0
        shape = (1,) * (rank - value.ndim) + value.shape
        if value.ndim > rank or any(extent != 1 for axis, extent in enumerate(shape)
                                    if axis != channel_axis) or shape[channel_axis] not in (1, count):
            raise self.unsupported(node, f'its constant of shape {list(value.shape)} is not one value per channel '
                                         f'of the {count} at axis {channel_axis}')
        vector = np.broadcast_to(value.reshape(-1), (count,)).copy()
        if self.stage == 'head' and self.order is not None:
            reordered = np.empty_like(vector)
            reordered[self.order] = vector
            vector = reordered
        return vector

    def elementwise(self, node, data_index, scale_of, shift_of):
        other = node.input[1 - data_index]
        value = self.per_channel(node, self.constant(other, self.node_label))
        if data_index != 0 and node.op_type in ('Sub', 'Div'):
            raise self.unsupported(node, f'{node.op_type} of a constant by the computed tensor')
        self.affine(node, scale_of(value), shift_of(value))

    def op_Add(self, node, data_index, attributes, last):
        self.elementwise(node, data_index, np.ones_like, lambda value: value)

    def op_Sub(self, node, data_index, attributes, last):
        self.elementwise(node, data_index, np.ones_like, lambda value: -value)

    def op_Mul(self, node, data_index, attributes, last):
        self.elementwise(node, data_index, lambda value: value, np.zeros_like)

    def op_Div(self, node, data_index, attributes, last):
        self.elementwise(node, data_index, lambda value: 1. / value, np.zeros_like)

    def op_BatchNormalization(self, node, data_index, attributes, last):
        if attributes.get('training_mode', 0) or any(name for name in node.output[1:]):
            raise self.unsupported(node, 'a BatchNormalization in training mode')
        if self.stage != 'head':
            self.require_nchw(node)
        weight, bias, mean, variance = (self.per_channel(node, self.constant(name, self.node_label), broadcast=False)
                                        for name in node.input[1:5])
        epsilon = float(attributes.get('epsilon', 1e-5))
        scale = weight / np.sqrt(variance + epsilon)
        self.affine(node, scale, bias - mean * scale, statistics=(weight, bias, mean, variance, epsilon))

    def affine(self, node, scale, shift, statistics=None):
        """Apply ``x ↦ scale·x + shift`` per channel: fold it into the convolution or linear layer or BatchNorm1d
        just before, else (in the head) append a BatchNorm1d holding it."""
        layers = self.layers()
        last = layers[-1] if layers else None
        with torch.no_grad():
            if isinstance(last, (nn.Conv2d, nn.Linear)):
                factor = torch.from_numpy(scale).to(last.weight)
                last.weight.mul_(factor.reshape(-1, *([1] * (last.weight.ndim - 1))))
                last.bias.copy_(factor * last.bias + torch.from_numpy(shift).to(last.bias))
            elif isinstance(last, nn.BatchNorm1d):
                last.weight.mul_(torch.from_numpy(scale).to(last.weight))
                last.bias.copy_(torch.from_numpy(scale).to(last.bias) * last.bias
                                + torch.from_numpy(shift).to(last.bias))
            elif self.stage == 'head':
                weight, bias, mean, variance, epsilon = statistics or (scale, shift, np.zeros_like(scale),
                                                                       np.ones_like(scale), 0.)
                batch_norm = nn.BatchNorm1d(len(scale), eps=epsilon).eval()
                for tensor, value in zip((batch_norm.weight, batch_norm.bias, batch_norm.running_mean,
                                          batch_norm.running_var), (weight, bias, mean, variance)):
                    tensor.copy_(torch.from_numpy(value))
                self.append(batch_norm, node)
            else:
                raise self.unsupported(node, f'a per-channel scale or shift after a {type(last).__name__}, not '
                                             f'after a convolution: a VGG\'s features cannot hold it')

    def op_Softmax(self, node, data_index, attributes, last):
        self.require_stage(node, 'head')
        if not last or int(attributes.get('axis', -1)) not in (1, -1):
            raise self.unsupported(node, 'a Softmax that is not the last node, over the classes')
        self.result.softmax, self.result.logits = node.name or node.output[0], node.input[data_index]


def convert(model):
    """Read an ONNX model as torch modules in torchvision's VGG layout.

    Parameters
    ----------
    model: onnx.ModelProto

    Returns
    -------
    ConvertedGraph

    Raises
    ------
    GraphError
        Naming the node, its op and where it sits, for any node this converter does not read, or a graph that is
        not a chain from one input to one output.
    """
    return _Converter(model).convert()
