"""Model builders and checkpoints: shapes against torchvision's VGG, round trips, bare torchvision state dicts, and
every way a checkpoint file can be wrong."""
import os

import pytest
import torch
import torchvision
from torch import nn

from lrp_brain import model as model_module
from lrp_brain.data import CLASS_NAMES, Transform
from lrp_brain.model import (
    CheckpointError, build_model, init_imagenet, load_checkpoint, load_demo_model, resolve_device, save_checkpoint,
    vgg16_small,
)


def layers(model, kind):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kind)]


def random_input(size=32, batch=2):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def shapes(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# --- builders -----------------------------------------------------------------------------------------------------

def test_small_vgg16_topology():
    model = vgg16_small(width=8, num_classes=3)
    convolutions = [module.out_channels for _, module in layers(model, nn.Conv2d)]
    assert convolutions == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert len(layers(model, nn.MaxPool2d)) == 5
    assert [(name, module.in_features, module.out_features) for name, module in layers(model, nn.Linear)] == [
        ('classifier.0', 64 * 7 * 7, 512), ('classifier.3', 512, 512), ('classifier.6', 512, 3),
    ]
    assert model(random_input(32)).shape == (2, 3)


@pytest.mark.parametrize('arch, convolutions', [('vgg11', 8), ('vgg13', 10), ('vgg16', 13), ('vgg19', 16)])
def test_depths_and_batch_norm(arch, convolutions):
    plain, normed = build_model(arch, 4, width=2), build_model(arch + '_bn', 4, width=2)
    assert len(layers(plain, nn.Conv2d)) == convolutions and not layers(plain, nn.BatchNorm2d)
    assert len(layers(normed, nn.BatchNorm2d)) == convolutions
    assert shapes(build_model(arch, 4, width=2, batch_norm=True)) == shapes(normed)


def test_full_width_is_torchvision_vgg():
    with torch.device('meta'):
        full = build_model('vgg16_bn', num_classes=3)
        narrow = build_model('vgg16_bn', num_classes=3, width=64)
        reference = torchvision.models.vgg16_bn(weights=None, num_classes=3)
    assert isinstance(full, torchvision.models.VGG)
    assert shapes(full) == shapes(reference) == shapes(narrow)
    assert list(shapes(narrow)) == list(shapes(reference))


@pytest.mark.parametrize('arguments', [
    {'arch': 'resnet50'}, {'arch': 'vgg16_bn_bn'}, {'width': 0}, {'width': 2.5}, {'num_classes': 0},
])
def test_bad_build_arguments(arguments):
    with pytest.raises(CheckpointError, match=str(list(arguments.values())[0])):
        build_model(**arguments)


# --- checkpoints --------------------------------------------------------------------------------------------------

def test_round_trip_keeps_weights_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = vgg16_small(width=4, num_classes=3, batch_norm=True)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
    transform = Transform(size=48, mean=(.5,), std=(.25,)).to_dict()
    path = tmp_path / 'model.pt'
    save_checkpoint(path, model, {'arch': 'vgg16_bn', 'input_size': 48, 'transform': transform,
                                  'split_file': tmp_path / 'split.json', 'val_accuracy': .75, 'extra': (1, 2)})
    assert os.listdir(tmp_path) == ['model.pt']

    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert torch.equal(loaded(random_input(48)), model.eval()(random_input(48)))
    assert meta == {
        'arch': 'vgg16', 'width': 4, 'batch_norm': True, 'num_classes': 3, 'class_names': list(CLASS_NAMES),
        'input_size': 48, 'transform': transform, 'split_file': str(tmp_path / 'split.json'), 'val_accuracy': .75,
        'extra': [1, 2], 'avgpool': [7, 7],
        'head': [['Linear', 32 * 7 * 7, 256, True], ['ReLU'], ['Dropout', .5], ['Linear', 256, 256, True], ['ReLU'],
                 ['Dropout', .5], ['Linear', 256, 3, True]],
    }
    payload = torch.load(path, weights_only=True)
    assert payload['format'] == 'lrp-brain-checkpoint' and payload['version'] == 1


def test_save_refuses_metadata_that_contradicts_the_model_or_needs_code(tmp_path):
    model = vgg16_small(width=4)
    with pytest.raises(CheckpointError, match='meta field arch is .vgg11. but the model is vgg16'):
        save_checkpoint(tmp_path / 'a.pt', model, {'arch': 'vgg11'})
    with pytest.raises(CheckpointError, match='meta field num_classes is 4'):
        save_checkpoint(tmp_path / 'a.pt', model, {'num_classes': 4})
    with pytest.raises(CheckpointError, match=r'meta field meta\.transform\.mean: object'):
        save_checkpoint(tmp_path / 'a.pt', model, {'transform': {'mean': object()}})
    assert not os.listdir(tmp_path)


def test_bare_torchvision_vgg16_state_dict_loads(tmp_path):
    """The study's ``VGG16_X.pth``: torchvision's VGG16 with a 3-way last layer, saved as a bare state dict."""
    torch.manual_seed(0)
    original = torchvision.models.vgg16(weights=None, num_classes=3).eval()
    path = tmp_path / 'VGG16_X.pth'
    torch.save(original.state_dict(), path)
    model, meta = load_checkpoint(path)
    assert (meta['arch'], meta['width'], meta['batch_norm'], meta['num_classes']) == ('vgg16', None, False, 3)
    assert meta['inferred'] and meta['source'] == str(path) and meta['class_names'] == list(CLASS_NAMES)
    assert meta['transform']['value_range'] == [0., 1.] and meta['input_size'] == 224
    assert torch.equal(model(random_input(32)), original(random_input(32)))


def test_bare_width_reduced_state_dict_loads(tmp_path):
    original = build_model('vgg11_bn', num_classes=5, width=4).eval()
    path = tmp_path / 'small.pth'
    torch.save(original.state_dict(), path)
    model, meta = load_checkpoint(path)
    assert (meta['arch'], meta['width'], meta['batch_norm'], meta['num_classes']) == ('vgg11', 4, True, 5)
    assert meta['class_names'] == [f'class_{index}' for index in range(5)]
    assert torch.equal(model(random_input(32)), original(random_input(32)))


class Payload:
    """Unpickling this would write a file: the proof that no code ran."""
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return open, (self.sentinel, 'w')


def test_checkpoint_needing_pickled_code_is_refused(tmp_path):
    sentinel = tmp_path / 'code-ran'
    path = tmp_path / 'evil.pt'
    torch.save({'state_dict': vgg16_small(width=2).state_dict(), 'payload': Payload(str(sentinel))}, path)
    with pytest.raises(CheckpointError, match='evil.pt: refused: loading it needs pickled code'):
        load_checkpoint(path)
    assert not sentinel.exists()

    whole_model = tmp_path / 'whole.pt'
    torch.save(vgg16_small(width=2), whole_model)
    with pytest.raises(CheckpointError, match=r'whole.pt: refused: .*pickled code \(.*NarrowVGG'):
        load_checkpoint(whole_model)


def test_shape_mismatch_names_the_layer(tmp_path):
    path = tmp_path / 'four.pt'
    save_checkpoint(path, vgg16_small(width=4, num_classes=4), {})
    payload = torch.load(path, weights_only=True)
    # metadata for 3 classes, consistent in itself, over weights for 4
    payload['meta'].update(num_classes=3, class_names=['a', 'b', 'c'])
    payload['meta']['head'][-1] = ['Linear', 256, 3, True]
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert 'four.pt' in str(error.value)
    assert 'classifier.6.weight: checkpoint (4, 256) vs model (3, 256)' in str(error.value)
    assert 'classifier.6.bias: checkpoint (4,) vs model (3,)' in str(error.value)


@pytest.mark.parametrize('saved, labelled, problem', [
    ('vgg13', 'vgg11', 'missing features'),  # the metadata names a shallower network
    ('vgg11', 'vgg16', r'missing features\.2\.weight; missing features\.2\.bias; .*; and 32 more$'),
])
def test_wrong_architecture_names_the_layers(tmp_path, saved, labelled, problem):
    path = tmp_path / f'{saved}.pt'
    save_checkpoint(path, build_model(saved, width=4), {})
    payload = torch.load(path, weights_only=True)
    payload['meta']['arch'] = labelled
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf'{saved}.pt: the weights, {saved} \(width 4, 3 classes\), do not '
                                              rf'fit {labelled} \(width 4, 3 classes\): .*{problem}'):
        load_checkpoint(path)


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'text'])
def test_damaged_file_names_the_file(tmp_path, damage):
    path = tmp_path / f'{damage}.pt'
    save_checkpoint(path, vgg16_small(width=2), {})
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 2], 'empty': b'', 'text': b'not a checkpoint'}[damage])
    with pytest.raises(CheckpointError, match=f'{damage}.pt: not a readable torch checkpoint'):
        load_checkpoint(path)


@pytest.mark.parametrize('payload, message', [
    ({'format': 'lrp-brain-checkpoint', 'version': 2, 'state_dict': {}, 'meta': {}}, 'version 2'),
    ({'format': 'lrp-brain-checkpoint', 'version': 1, 'state_dict': {}, 'meta': {'arch': 'vgg16'}},
     'meta lacks the field.s. width, batch_norm, num_classes'),
    ([torch.zeros(2)], 'neither an lrp-brain checkpoint nor a state dict'),
    ({'conv.weight': torch.zeros(2, 3, 3, 3)}, 'not a VGG state dict'),
])
def test_unusable_contents(tmp_path, payload, message):
    path = tmp_path / 'odd.pt'
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f'odd.pt: .*{message}'):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match='absent.pt: no such checkpoint file'):
        load_checkpoint(tmp_path / 'absent.pt')


# --- ImageNet initialisation, demo model, device ---------------------------------------------------------------

def test_init_imagenet_loads_all_but_the_head(tmp_path):
    torch.manual_seed(0)
    imagenet = build_model('vgg16', num_classes=1000, width=4)
    path = tmp_path / 'vgg16-imagenet.pth'
    torch.save(imagenet.state_dict(), path)
    model = build_model('vgg16', num_classes=3, width=4)
    head = model.classifier[6].weight.clone()

    loaded = init_imagenet(model, path)
    assert not any(name.startswith('classifier.6') for name in loaded)
    assert len(loaded) == len(imagenet.state_dict()) - 2
    assert all(torch.equal(model.state_dict()[name], imagenet.state_dict()[name]) for name in loaded)
    assert torch.equal(model.classifier[6].weight, head)

    mismatch = r'features\.0\.weight: checkpoint \(4, 3, 3, 3\) vs model \(8, 3, 3, 3\)'
    with pytest.raises(CheckpointError, match=mismatch):
        init_imagenet(build_model('vgg16', width=8), path)
    with pytest.raises(CheckpointError, match=r'vgg16 \(width 4, 1000 classes\), do not fit the model, vgg16_bn '
                                              r'\(width 4, 3 classes\) \(its last layer aside\): features\.'):
        init_imagenet(build_model('vgg16_bn', width=4), path)


def test_demo_model_missing_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, 'DEMO_MODEL_PATH', tmp_path / 'demo_model.pt')
    with pytest.raises(CheckpointError, match='demo_model.pt: the demo model has not been created yet.*lrp-brain '
                                              'train'):
        load_demo_model()


def test_resolve_device():
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto') == torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(ValueError, match='tpu'):
        resolve_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            resolve_device('cuda')
    else:
        with pytest.raises(ValueError, match='CUDA device'):
            resolve_device(f'cuda:{torch.cuda.device_count()}')


# --- any VGG head ---------------------------------------------------------------------------------------------------

#: The head of many Keras-trained brain-MRI VGGs, at width 4 after a 1×1 average pool.
FOREIGN_HEAD = [['Linear', 32, 16, True], ['ReLU'], ['BatchNorm1d', 16, 1e-3, True], ['Dropout', .25],
                ['Linear', 16, 8, True], ['ReLU'], ['Linear', 8, 4, True]]


def foreign_head_model(seed=0):
    """vgg16 features at width 4, a 1×1 average pool and :data:`FOREIGN_HEAD` (random BatchNorm statistics), as a
    user's own module would hold them."""
    torch.manual_seed(seed)
    model = vgg16_small(width=4, num_classes=4)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.BatchNorm1d(16, eps=1e-3), nn.Dropout(.25),
                                     nn.Linear(16, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
    batch_norm = model.classifier[2]
    with torch.no_grad():
        batch_norm.running_mean.normal_(0., .1)
        batch_norm.running_var.uniform_(.5, 2.)
        batch_norm.weight.uniform_(.5, 1.5)
        batch_norm.bias.normal_(0., .1)
    return model.eval()


def save_foreign(path):
    model = foreign_head_model()
    save_checkpoint(path, model, {'input_size': 32, 'transform': Transform(size=32).to_dict()})
    return model


def test_foreign_head_round_trips(tmp_path):
    path = tmp_path / 'foreign.pt'
    model = save_foreign(path)
    meta = torch.load(path, weights_only=True)['meta']
    assert meta['head'] == FOREIGN_HEAD and meta['avgpool'] == [1, 1]
    assert (meta['arch'], meta['width'], meta['num_classes']) == ('vgg16', 4, 4)

    loaded, meta = load_checkpoint(path)
    assert [type(module) for module in loaded.classifier] == [type(module) for module in model.classifier]
    assert loaded.classifier[2].eps == 1e-3 and loaded.classifier[3].p == .25
    assert torch.equal(loaded(random_input(32)), model(random_input(32)))
    assert torch.equal(loaded(random_input(64)), model(random_input(64)))  # the pool adapts to other sizes


def test_cli_check_passes_on_a_foreign_head(tmp_path):
    from click.testing import CliRunner

    from lrp_brain.cli import main

    path = tmp_path / 'foreign.pt'
    save_foreign(path)
    result = CliRunner().invoke(main, ['check', '--checkpoint', str(path)])
    assert result.exit_code == 0, result.output
    assert 'OK: safe to explain' in result.output
    assert 'classifier.2     batchnorm1d_fc1 BatchNorm1d        merged by a canonizer' in result.output


def test_save_refuses_a_head_layer_it_cannot_record(tmp_path):
    model = foreign_head_model()
    model.classifier[1] = nn.Tanh()
    with pytest.raises(CheckpointError, match=r'a.pt: classifier\.1 is Tanh\(\); a checkpoint\'s head holds Linear, '
                                              r'ReLU, BatchNorm1d .* and Dropout'):
        save_checkpoint(tmp_path / 'a.pt', model, {})
    model = foreign_head_model()
    model.avgpool = nn.AdaptiveAvgPool2d((None, 2))
    with pytest.raises(CheckpointError, match='avgpool AdaptiveAvgPool2d'):
        save_checkpoint(tmp_path / 'a.pt', model, {})
    assert not os.listdir(tmp_path)


def test_bare_state_dict_with_a_foreign_head_says_what_it_found_and_what_to_do(tmp_path):
    path = tmp_path / 'keras_like.pth'
    torch.save(foreign_head_model().state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f'{path}: a bare state dict of vgg16 (width 4, 4 classes) whose classifier is not '
                              f'torchvision\'s')
    assert 'found classifier.0 Linear(32→16), classifier.2 BatchNorm1d(16), classifier.4 Linear(16→8), ' \
           'classifier.6 Linear(8→4)' in message
    assert 'lrp_brain.model.save_checkpoint(path, model, meta)' in message and '`lrp-brain import`' in message


@pytest.mark.parametrize('hidden, pool', [(24, 7), (24, 1)])
def test_bare_state_dict_of_torchvision_layout_with_other_widths_loads(tmp_path, hidden, pool):
    """torchvision's classifier layout (Linear at 0, 3, 6) with its own widths and pool size, e.g. a fine-tuned
    VGG16 whose hidden layers were shrunk: read off the weights."""
    torch.manual_seed(0)
    model = vgg16_small(width=4, num_classes=2)
    model.avgpool = nn.AdaptiveAvgPool2d(pool)
    model.classifier = nn.Sequential(nn.Linear(32 * pool * pool, hidden), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(hidden, 12), nn.ReLU(True), nn.Dropout(), nn.Linear(12, 2))
    path = tmp_path / 'shrunk.pth'
    torch.save(model.state_dict(), path)
    loaded, meta = load_checkpoint(path)
    assert meta['inferred'] and meta['avgpool'] == [pool, pool] and meta['num_classes'] == 2
    assert meta['head'] == [['Linear', 32 * pool * pool, hidden, True], ['ReLU'], ['Dropout', .5],
                            ['Linear', hidden, 12, True], ['ReLU'], ['Dropout', .5], ['Linear', 12, 2, True]]
    assert torch.equal(loaded(random_input(32)), model.eval()(random_input(32)))


def test_the_same_vgg_with_another_head_names_both_heads(tmp_path):
    """The issue's message named the same architecture twice ('vgg16 (width 64, 4 classes), do not fit vgg16 (width
    64, 4 classes)'): when the VGGs agree, the heads are what differ, and the message shows both."""
    path = tmp_path / 'foreign.pt'
    save_foreign(path)
    payload = torch.load(path, weights_only=True)
    payload['meta']['head'] = [['Linear', 32, 12, True], ['ReLU'], ['Linear', 12, 4, True]]
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(
        f'{path}: the weights, vgg16 (width 4, 4 classes) with classifier classifier.0 Linear(32→16), classifier.2 '
        f'BatchNorm1d(16), classifier.4 Linear(16→8), classifier.6 Linear(8→4), do not fit the metadata\'s vgg16 '
        f'(width 4, 4 classes) with head Linear(32→12), ReLU, Linear(12→4): classifier.0.weight: checkpoint (16, 32) '
        f'vs model (12, 32)'
    )


@pytest.mark.parametrize('field, value, message', [
    ('head', [['Conv2d', 3]], (r"meta field head\[0\] is \['Conv2d', 3\]; a head layer is one of \[Linear, "
                               r"in_features, out_features, bias\]; \[ReLU\]")),
    ('head', FOREIGN_HEAD[:4] + [['Linear', 15, 8, True]] + FOREIGN_HEAD[5:],
     r'meta field head\[4\]: Linear\(15→8\) reads 15 features, but 16 come before it'),
    ('head', FOREIGN_HEAD[:3] + [['Dropout', 2]] + FOREIGN_HEAD[4:],
     r'meta field head\[3\]: Dropout p must be a probability from 0 to 1, got 2'),
    ('head', FOREIGN_HEAD[:2] + [['BatchNorm1d', 16, 1e-3, 'yes']] + FOREIGN_HEAD[3:],
     r'meta field head\[2\]: BatchNorm1d affine must be a bool'),
    ('head', FOREIGN_HEAD[:-1] + [['Linear', 8, 3, True]],
     r'meta field num_classes is 4, but the head .* has 3 outputs'),
    ('avgpool', [0, 1], r'meta field avgpool must be \[h, w\] of positive integers, got \[0, 1\]'),
])
def test_a_malformed_head_names_the_field(tmp_path, field, value, message):
    path = tmp_path / 'foreign.pt'
    save_foreign(path)
    payload = torch.load(path, weights_only=True)
    payload['meta'][field] = value
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f'foreign.pt: {message}'):
        load_checkpoint(path)
