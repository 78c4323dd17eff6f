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
        'extra': [1, 2],
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
    payload['meta']['num_classes'] = 3
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
