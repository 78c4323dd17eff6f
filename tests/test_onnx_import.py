"""``lrp-brain import``: ONNX VGGs as tf2onnx writes Keras models (NHWC input, MatMul + Add, BatchNorm as Mul/Add,
the flattening in NHWC order, a Softmax) and as ``torch.onnx.export`` writes torch ones, converted to the project's
network: its logits equal the source model's and its probabilities onnxruntime's, its relevance equals the reference
LRP, and what cannot be converted is refused by name."""
import sys
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torchvision.models.vgg import make_layers
from zennit.attribution import Gradient

from lrp_brain import onnx_graph
from lrp_brain.canonizers import batch_norm_affine
from lrp_brain.cli import main
from lrp_brain.composites import VGGComposite, zbox_bounds
from lrp_brain.model import CheckpointError, from_onnx, load_checkpoint, save_checkpoint
from lrp_brain.phantom import write_phantoms
from reference_lrp import randomize_biases_and_statistics, reference_lrp

pytestmark = pytest.mark.usefixtures('single_threaded')

#: torchvision's VGG16 configuration at width 4 (every width × 4/64).
CONFIG = [4, 4, 'M', 8, 8, 'M', 16, 16, 16, 'M', 32, 32, 32, 'M', 32, 32, 32, 'M']

#: The input side: the last pool leaves 2×2 maps, so the order of the NHWC flattening matters.
SIZE = 64

#: The class names given on import.
CLASSES = ['meningioma', 'glioma', 'pituitary']


class KerasShapedVGG(nn.Module):
    """A Keras VGG16 written in torch: NHWC input (permuted at the start), a BatchNorm after every convolution, the
    flattening in NHWC order (or, with ``global_pool``, Keras' GlobalAveragePooling2D), a head ``Linear → ReLU →
    BatchNorm1d → Dropout → Linear → ReLU → Linear`` and a Softmax. Random weights (He), biases and statistics;
    evaluation mode."""
    def __init__(self, global_pool=False, seed=0):
        super().__init__()
        self.global_pool = global_pool
        self.features = make_layers(CONFIG, batch_norm=True)
        self.head = nn.Sequential(nn.Linear(32 if global_pool else 32 * 2 * 2, 16), nn.ReLU(), nn.BatchNorm1d(16),
                                  nn.Dropout(.3), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
        randomize_biases_and_statistics(self, generator)
        self.eval()

    def logits(self, nhwc):
        maps = self.features(nhwc.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # reshape to (batch, -1) exports as a Reshape whose target is computed from the tensor's Shape
        return self.head(maps.mean((1, 2)) if self.global_pool else maps.reshape(nhwc.shape[0], -1))

    def forward(self, nhwc):
        return torch.softmax(self.logits(nhwc), dim=1)


def tf2onnx_graph(source, path, per_layer_transposes=False):
    """Write ``source`` as tf2onnx writes the Keras model: NHWC input and a Transpose, convolutions with explicit or
    SAME_UPPER padding, the BatchNorms as Mul/Add by per-channel constants or as BatchNormalization nodes, a Transpose
    back to NHWC and a Reshape to (-1, features) (or a ReduceMean over the spatial axes for a global pool), dense
    layers as MatMul + Add, the head's BatchNorm as Mul/Add, the Dropout as Identity (a Dropout node after a global
    pool), a Softmax; node names as Keras layers give them. With ``per_layer_transposes`` (tf2onnx without its
    transpose optimiser) every convolution and pool sits between Transposes to NCHW and back, and the convolution's
    bias and the Mul/Add BatchNorms act on NHWC tensors."""
    nodes, initializers = [], []

    def constant(name, array, dtype=np.float32):
        initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def node(op, name, inputs, **attributes):
        nodes.append(helper.make_node(op, inputs, [f'{name}:0'], name=name, **attributes))
        return f'{name}:0'

    def numpy(tensor):
        return tensor.detach().numpy()

    def transpose(flow, layout, wanted, name):
        if layout == wanted:
            return flow, layout
        return node('Transpose', name, [flow], perm=[0, 3, 1, 2] if wanted == 'NCHW' else [0, 2, 3, 1]), wanted

    flow, layout = 'input_1', 'NHWC'
    block, position = 1, 0
    for module in source.features:
        layer = f'block{block}_conv{position}'
        before = 'input_transpose' if flow == 'input_1' else f'{layer}_{len(nodes)}/transpose'
        if isinstance(module, nn.Conv2d):
            position += 1
            layer = f'block{block}_conv{position}'
            flow, layout = transpose(flow, layout, 'NCHW', before)
            padding = {'auto_pad': 'SAME_UPPER'} if position % 2 else {'pads': [1, 1, 1, 1]}
            bias = constant(f'{layer}/bias', numpy(module.bias))
            flow = node('Conv', f'{layer}/Conv2D', [flow, constant(f'{layer}/kernel', numpy(module.weight)),
                                                    *([] if per_layer_transposes else [bias])],
                        kernel_shape=[3, 3], **padding)
            if per_layer_transposes:
                flow, layout = transpose(flow, layout, 'NHWC', f'{layer}/transpose_back')
                flow = node('Add', f'{layer}/BiasAdd', [flow, bias])
        elif isinstance(module, nn.BatchNorm2d) and block % 2:
            scale, shift = (numpy(value).reshape((1, -1, 1, 1) if layout == 'NCHW' else -1)
                            for value in batch_norm_affine(module))
            flow = node('Mul', f'{layer}_bn/mul', [flow, constant(f'{layer}_bn/scale', scale)])
            flow = node('Add', f'{layer}_bn/add', [flow, constant(f'{layer}_bn/shift', shift)])
        elif isinstance(module, nn.BatchNorm2d):
            flow, layout = transpose(flow, layout, 'NCHW', before)
            statistics = [constant(f'{layer}_bn/{name}', numpy(getattr(module, name)))
                          for name in ('weight', 'bias', 'running_mean', 'running_var')]
            flow = node('BatchNormalization', f'{layer}_bn/FusedBatchNormV3', [flow, *statistics],
                        epsilon=module.eps)
        elif isinstance(module, nn.ReLU):
            flow = node('Relu', f'{layer}/Relu', [flow])
        else:
            flow, layout = transpose(flow, layout, 'NCHW', before)
            flow = node('MaxPool', f'block{block}_pool/MaxPool', [flow], kernel_shape=[2, 2], strides=[2, 2])
            if per_layer_transposes:
                flow, layout = transpose(flow, layout, 'NHWC', f'block{block}_pool/transpose_back')
            block, position = block + 1, 0
    flow, layout = transpose(flow, layout, 'NHWC', 'flatten_transpose')
    if source.global_pool:
        flow = node('ReduceMean', 'global_average_pooling2d/Mean', [flow], axes=[1, 2], keepdims=0)
    else:
        flow = node('Reshape', 'flatten/Reshape', [flow, constant('flatten/shape', [-1, 128], np.int64)])
    dense = 0
    for module in source.head:
        layer = f'dense_{dense}'
        if isinstance(module, nn.Linear):
            dense += 1
            layer = f'dense_{dense}'
            flow = node('MatMul', f'{layer}/MatMul', [flow, constant(f'{layer}/kernel', numpy(module.weight).T)])
            flow = node('Add', f'{layer}/BiasAdd', [flow, constant(f'{layer}/bias', numpy(module.bias))])
        elif isinstance(module, nn.ReLU):
            flow = node('Relu', f'{layer}/Relu', [flow])
        elif isinstance(module, nn.BatchNorm1d):
            scale, shift = (numpy(value) for value in batch_norm_affine(module))
            flow = node('Mul', 'batch_normalization/mul', [flow, constant('batch_normalization/scale', scale)])
            flow = node('Add', 'batch_normalization/add', [flow, constant('batch_normalization/shift', shift)])
        elif source.global_pool:
            flow = node('Dropout', 'dropout/Dropout', [flow, constant('dropout/rate', module.p)])
        else:
            flow = node('Identity', 'dropout/Identity', [flow])
    flow = node('Softmax', 'predictions/Softmax', [flow], axis=-1)
    graph = helper.make_graph(
        nodes, 'keras_vgg16', [helper.make_tensor_value_info('input_1', TensorProto.FLOAT, ['unk__0', SIZE, SIZE, 3])],
        [helper.make_tensor_value_info(flow, TensorProto.FLOAT, ['unk__0', 3])], initializers,
    )
    model = helper.make_model(graph, producer_name='tf2onnx', producer_version='1.16.1',
                              opset_imports=[helper.make_opsetid('', 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def torch_export(model, path, example):
    """``torch.onnx.export`` with the TorchScript exporter (the dynamo one needs onnxscript), batch dimension free."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=['image'], output_names=['scores'],
                          dynamic_axes={'image': {0: 'batch'}})
    return path


def relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


def nhwc_images(count=3, low=0., high=1., seed=1):
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, SIZE, SIZE, 3, generator=generator)


def onnxruntime_output(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


def edited(path, edit, out):
    """Save the graph of ``path`` after ``edit(model)`` to ``out``."""
    model = onnx.load(path)
    edit(model)
    onnx.save(model, out)
    return out


def graph_node(model, name):
    return next(node for node in model.graph.node if node.name == name)


@pytest.fixture(scope='module')
def source():
    return KerasShapedVGG()


@pytest.fixture(scope='module')
def keras_file(source, tmp_path_factory):
    return tf2onnx_graph(source, tmp_path_factory.mktemp('keras') / 'keras_vgg16.onnx')


# --- conversion -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('writer', ['tf2onnx', 'tf2onnx, global pool', 'tf2onnx, per-layer transposes',
                                    'torch.onnx.export'])
def test_keras_shaped_model_converts_to_the_same_function(source, keras_file, tmp_path, writer):
    if writer == 'tf2onnx, global pool':
        source = KerasShapedVGG(global_pool=True, seed=1)
        path = tf2onnx_graph(source, tmp_path / 'keras_gap.onnx')
    elif writer == 'tf2onnx, per-layer transposes':
        path = tf2onnx_graph(source, tmp_path / 'keras_transposes.onnx', per_layer_transposes=True)
        assert sum(node.op_type == 'Transpose' for node in onnx.load(path).graph.node) == 2 * (13 + 5)
    else:
        path = keras_file if writer == 'tf2onnx' else torch_export(source, tmp_path / 'keras.onnx', nhwc_images(1))
    model, meta = from_onnx(path, class_names=CLASSES)
    images = nhwc_images()
    with torch.no_grad():
        logits, expected = model(images.permute(0, 3, 1, 2)), source.logits(images)
    assert relative_error(logits, expected) < 1e-5
    assert torch.allclose(torch.softmax(logits, 1), onnxruntime_output(path, images), atol=1e-6)

    assert meta['layout'] == 'NHWC' and meta['input_size'] == SIZE
    assert (meta['arch'], meta['width'], meta['batch_norm'], meta['num_classes']) == ('vgg16', 4, False, 3)
    assert meta['class_names'] == CLASSES
    # tf2onnx's Mul/Add pair becomes a BatchNorm1d of mean 0, variance 1 and eps 0; torch's keeps its statistics
    epsilon = pytest.approx(1e-5) if writer == 'torch.onnx.export' else 0.
    dropout = [['Dropout', pytest.approx(.3)]] if source.global_pool else []
    assert meta['avgpool'] == ([1, 1] if source.global_pool else [2, 2])
    assert meta['head'] == [['Linear', 32 if source.global_pool else 128, 16, True], ['ReLU'],
                            ['BatchNorm1d', 16, epsilon, True], *dropout, ['Linear', 16, 8, True], ['ReLU'],
                            ['Linear', 8, 3, True]]
    assert meta['imported']['softmax_dropped'] and meta['imported']['onnxruntime_difference'] < 1e-6
    assert meta['imported']['producer'].startswith('pytorch' if writer == 'torch.onnx.export' else 'tf2onnx')
    assert [type(module) for module in model.features] == [type(module) for module in make_layers(CONFIG)]


@pytest.mark.parametrize('pool, exported_as', [(1, 'GlobalAveragePool'), (2, 'AveragePool')])
def test_torchvision_layout_nchw_export_keeps_every_weight(tmp_path, pool, exported_as):
    """A torchvision-style VGG (NCHW, Gemm head, the average pool exported as a pool node; torchvision's own 7×7 pool
    on 224 px input exports as the 1×1 AveragePool that pool 2 gives here): nothing to fold, so the imported weights
    are the source's, bit for bit."""
    torch.manual_seed(2)
    source = nn.Sequential()
    source.features = make_layers(CONFIG)
    source.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
    source.flatten = nn.Flatten()
    source.classifier = nn.Sequential(nn.Linear(32 * pool * pool, 16), nn.ReLU(True), nn.Dropout(),
                                      nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 3))
    source.eval()
    path = torch_export(source, tmp_path / 'torchvision.onnx', torch.rand(1, 3, SIZE, SIZE))
    assert exported_as in {node.op_type for node in onnx.load(path).graph.node}
    model, meta = from_onnx(path)
    assert meta['layout'] == 'NCHW' and meta['avgpool'] == [pool, pool] and not meta['imported']['softmax_dropped']
    assert meta['class_names'] == ['class_0', 'class_1', 'class_2']
    # torch.onnx.export leaves out the Dropouts (identities in evaluation): the classifier indices close up
    assert meta['head'] == [['Linear', 32 * pool * pool, 16, True], ['ReLU'], ['Linear', 16, 16, True], ['ReLU'],
                            ['Linear', 16, 3, True]]
    imported, expected = list(model.state_dict().values()), list(source.state_dict().values())
    assert len(imported) == len(expected) == 2 * 13 + 2 * 3
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(imported, expected))


@pytest.mark.zennit_both
def test_relevance_of_the_imported_network_equals_the_reference(keras_file, tmp_path):
    """The composite on the imported network (its head BatchNorm folded by the canonizer) equals the reference LRP on
    the same network with that BatchNorm folded by hand into the next layer, with the z^B bounds of the checkpoint's
    value range 0..255."""
    model, meta = from_onnx(keras_file, value_range=(0, 255))
    save_checkpoint(tmp_path / 'keras.pt', model, meta)
    model, meta = load_checkpoint(tmp_path / 'keras.pt')
    low, high = zbox_bounds(meta['transform'])
    assert (low, high) == (0., 255.)
    model = model.double()
    reference = model.__class__(model.features, model.avgpool, nn.Sequential(*model.classifier)).double()
    batch_norm, following = reference.classifier[2], reference.classifier[3]
    scale = batch_norm.weight / (batch_norm.running_var + batch_norm.eps).sqrt()
    shift = batch_norm.bias - batch_norm.running_mean * scale
    folded = nn.Linear(16, 8).double()
    with torch.no_grad():
        folded.weight.copy_(following.weight * scale)  # W(s·x + t) + b = (W·diag(s))x + (b + W·t)
        folded.bias.copy_(following.bias + following.weight @ shift)
    reference.classifier = nn.Sequential(reference.classifier[0], reference.classifier[1], nn.Identity(), folded,
                                         *reference.classifier[4:])
    images = nhwc_images(2, 0., 255.).permute(0, 3, 1, 2).double()
    attr_output = torch.eye(3, dtype=torch.float64)[[0, 2]]
    expected_output, expected = reference_lrp(reference, images, attr_output=attr_output, low=low, high=high)
    with Gradient(model, VGGComposite(low=low, high=high)) as attributor:
        output, relevance = attributor(images, attr_output)
    output = output.detach()
    assert relative_error(output, expected_output) < 1e-12
    assert expected.abs().max() > 0
    assert relative_error(relevance, expected) < 1e-6


def test_gemm_with_its_factors_converts(source, keras_file, tmp_path):
    """A dense layer as one Gemm with alpha, beta, an untransposed B and a bias C, instead of MatMul + Add."""
    def to_gemm(model):
        weights = {tensor.name: tensor for tensor in model.graph.initializer}
        matmul, add = graph_node(model, 'dense_2/MatMul'), graph_node(model, 'dense_2/BiasAdd')
        kernel, bias = (numpy_helper.to_array(weights[name]) for name in ('dense_2/kernel', 'dense_2/bias'))
        weights['dense_2/kernel'].CopyFrom(numpy_helper.from_array(kernel / 4, 'dense_2/kernel'))
        weights['dense_2/bias'].CopyFrom(numpy_helper.from_array(bias * 2, 'dense_2/bias'))
        gemm = helper.make_node('Gemm', [matmul.input[0], 'dense_2/kernel', 'dense_2/bias'], list(add.output),
                                name='dense_2/Gemm', alpha=4., beta=.5, transB=0)
        position = list(model.graph.node).index(matmul)
        model.graph.node.remove(add)
        model.graph.node.remove(matmul)
        model.graph.node.insert(position, gemm)

    model, meta = from_onnx(edited(keras_file, to_gemm, tmp_path / 'gemm.onnx'))
    images = nhwc_images()
    with torch.no_grad():
        assert relative_error(model(images.permute(0, 3, 1, 2)), source.logits(images)) < 1e-5
    assert meta['head'][3] == ['Linear', 16, 8, True]


def test_normalisation_is_recorded_and_bounds_follow(keras_file):
    _, meta = from_onnx(keras_file, mean=[.5], std=[.25])
    assert meta['transform']['mean'] == [.5] and meta['transform']['std'] == [.25]
    low, high = zbox_bounds(meta['transform'])
    assert torch.allclose(low, torch.tensor(-2.)) and torch.allclose(high, torch.tensor(2.))


# --- refusals -------------------------------------------------------------------------------------------------

def set_op(name, op):
    def edit(model):
        graph_node(model, name).op_type = op
    return edit


def set_attribute(name, **attributes):
    def edit(model):
        node = graph_node(model, name)
        kept = [attribute for attribute in node.attribute if attribute.name not in attributes]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(key, value) for key, value in attributes.items()])
    return edit


def read_twice(name):
    def edit(model):
        node = graph_node(model, name)
        node.input[1] = node.input[0]
    return edit


def rescale_input(model):
    """Put a Keras Rescaling(1/255) layer, a Mul by a constant, between the input and the first Transpose."""
    model.graph.initializer.append(numpy_helper.from_array(np.float32(1 / 255), 'rescaling/scale'))
    graph_node(model, 'input_transpose').input[0] = 'rescaling/mul:0'
    model.graph.node.insert(0, helper.make_node('Mul', ['input_1', 'rescaling/scale'], ['rescaling/mul:0'],
                                                name='rescaling/mul'))


@pytest.mark.parametrize('edit, message', [
    (rescale_input,
     r"node 'rescaling/mul' \(op Mul, 1 of \d+\) \(before the first convolution\): the graph scales its input"),
    (set_op('dense_2/Relu', 'Tanh'),
     (r"node 'dense_2/Relu' \(op Tanh, \d+ of \d+\) \(in the classifier head, after node 'dense_2/BiasAdd'\): not "
     r"supported")),
    (set_op('block3_conv2/Relu', 'LeakyRelu'),
     r"node 'block3_conv2/Relu' \(op LeakyRelu, .*in conv block 3 of the features.*not supported"),
    (read_twice('dense_1/BiasAdd'), r"node 'dense_1/BiasAdd' \(op Add\): combines 2 computed tensors"),
    (set_attribute('block1_conv2/Conv2D', pads=[1, 1, 0, 0]),
     r"node 'block1_conv2/Conv2D' \(op Conv, \d+ of \d+\): padding \[1, 1, 0, 0\] .*is not symmetric"),
    (set_attribute('block2_conv1/Conv2D', pads=[2, 2, 2, 2], dilations=[2, 2]),
     (r"features\.5 of the graph is Conv2d\(4, 8, kernel_size=\(3, 3\), stride=\(1, 1\), padding=\(2, 2\), "
     r"dilation=\(2, 2\)\) \(node 'block2_conv1/Conv2D'\), but a vgg16 \(width 4, 3 classes\) has Conv2d\(4, 8, "
     r"kernel_size=\(3, 3\), stride=\(1, 1\), padding=\(1, 1\)\) there")),
])
def test_what_cannot_be_converted_is_refused_by_name(keras_file, tmp_path, edit, message):
    path = edited(keras_file, edit, tmp_path / 'edited.onnx')
    with pytest.raises(CheckpointError, match=rf'edited\.onnx: {message}'):
        from_onnx(path)


def test_a_conversion_that_onnxruntime_contradicts_is_refused(keras_file, monkeypatch):
    """A converter that forgot the head's ReLUs: the check against onnxruntime catches it, with the figure."""
    convert_relu = onnx_graph._Converter.op_Relu

    def features_only(self, node, *arguments, **keywords):
        if self.stage != 'head':
            convert_relu(self, node, *arguments, **keywords)

    monkeypatch.setattr(onnx_graph._Converter, 'op_Relu', features_only)
    with pytest.raises(CheckpointError, match=r'keras_vgg16\.onnx: refused: the converted network differs from '
                                              r'onnxruntime by \d\.\d+(e-\d+)? of the largest logit on 4 random'):
        from_onnx(keras_file)


def test_unreadable_file_and_missing_extra(tmp_path, keras_file, monkeypatch):
    broken = tmp_path / 'broken.onnx'
    broken.write_bytes(b'not an onnx model')
    with pytest.raises(CheckpointError, match='broken.onnx: not a readable ONNX model'):
        from_onnx(broken)
    with pytest.raises(CheckpointError, match=r'2 class names \(a, b\) for a network with 3 outputs'):
        from_onnx(keras_file, class_names=['a', 'b'])
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    with pytest.raises(CheckpointError, match=r'needs the onnx extra: pip install "lrp-brain\[onnx\]"'):
        from_onnx(keras_file)


# --- the command ------------------------------------------------------------------------------------------------

def test_cli_import_then_every_command_works_on_the_checkpoint(keras_file, tmp_path):
    out = tmp_path / 'keras.pt'
    runner = CliRunner()
    result = runner.invoke(main, ['import', str(keras_file), '--out', str(out), '--classes', ','.join(CLASSES),
                                  '--value-range', '0,1'])
    assert result.exit_code == 0, result.output
    assert 'NHWC input 64×64' in result.output and "dropped the final Softmax (predictions/Softmax)" in result.output
    assert 'Linear(128→16), ReLU, BatchNorm1d(16), Linear(16→8), ReLU, Linear(8→3)' in result.output
    _, meta = load_checkpoint(out)
    assert meta['class_names'] == CLASSES and meta['layout'] == 'NHWC'

    result = runner.invoke(main, ['check', '--checkpoint', str(out)])
    assert result.exit_code == 0, result.output
    assert 'OK: safe to explain' in result.output and 'merged by a canonizer' in result.output

    data = tmp_path / 'phantoms'
    write_phantoms(data, 2, seed=3, sizes=(64,), quiet=True)
    result = runner.invoke(main, ['explain', '--quiet', '--device', 'cpu', '--checkpoint', str(out), '--data',
                                  str(data), '--index', '0', '--out', str(tmp_path / 'explanations')])
    assert result.exit_code == 0, result.output
    assert '64×64 input' in result.output

    result = runner.invoke(main, ['import', str(keras_file), '--out', str(tmp_path / 'bad.pt'), '--classes', 'a,b'])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert 'for a network with 3 outputs' in result.output and not (tmp_path / 'bad.pt').exists()
