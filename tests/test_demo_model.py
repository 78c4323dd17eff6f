"""The demo model shipped in the package classifies phantoms it has never seen: a set drawn with a new seed."""
import numpy as np
import pytest
import torch

from lrp_brain.data import CLASS_NAMES, Transform, find_slices, read_slice
from lrp_brain.model import DEMO_MODEL_PATH, load_demo_model
from lrp_brain.phantom import write_phantoms

#: The demo model was trained on phantoms of seed 0 (see lrp_brain/assets/README.md); these are new.
FRESH_SEED = 20240611
FRESH_COUNT = 120


@pytest.fixture(scope='module')
def demo():
    return load_demo_model()


def test_demo_model_is_a_small_vgg16_with_its_preprocessing(demo):
    model, meta = demo
    assert DEMO_MODEL_PATH.stat().st_size < 4 * 2 ** 20
    assert meta['arch'] == 'vgg16' and not meta['batch_norm'] and meta['width'] is not None
    assert sum(isinstance(module, torch.nn.Conv2d) for module in model.features) == 13
    assert sum(isinstance(module, torch.nn.Linear) for module in model.classifier) == 3
    assert meta['class_names'] == list(CLASS_NAMES)
    transform = Transform.from_dict(meta['transform'])
    assert transform.size == meta['input_size'] and transform.value_range == (0., 1.) and not transform.flips
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_demo_model_classifies_fresh_phantoms(demo, tmp_path):
    model, meta = demo
    transform = Transform.from_dict(meta['transform'])
    refs = write_phantoms(tmp_path, FRESH_COUNT, seed=FRESH_SEED, quiet=True)
    assert refs == find_slices(tmp_path)
    slices = [read_slice(ref) for ref in refs]
    images = torch.stack([transform(item.image)[0] for item in slices])
    labels = np.array([item.label for item in slices])
    assert set(labels) == {0, 1, 2}
    with torch.no_grad():
        predictions = model(images).argmax(1).numpy()
    accuracy = np.mean(predictions == labels)
    print(f'demo model on {FRESH_COUNT} fresh phantoms (seed {FRESH_SEED}): accuracy {accuracy:.4f}')
    assert accuracy >= .95
