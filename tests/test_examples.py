"""The example scripts run as they are, from a fresh folder, and write sane outputs.

Each example runs in a subprocess with its working folder and the phantom cache in a temporary folder. The examples
use the demo model; until it has been trained a small checkpoint stands in (their ``--checkpoint`` option).
"""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_brain.data import Transform
from lrp_brain.explain import METHODS
from lrp_brain.model import DEMO_MODEL_PATH, default_meta, load_checkpoint, save_checkpoint, vgg16_small

pytestmark = [pytest.mark.zennit_both, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / 'examples'


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    """``(extra arguments, input size)``: none for the demo model, else ``--checkpoint`` of a small one."""
    if DEMO_MODEL_PATH.is_file():
        return [], load_checkpoint(DEMO_MODEL_PATH)[1]['input_size']
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('model') / 'model.pt'
    save_checkpoint(path, vgg16_small(width=4), {**default_meta('vgg16', 4), 'transform': Transform(size=32).to_dict(),
                                                 'input_size': 32})
    return ['--checkpoint', str(path)], 32


def run_example(name, folder, *arguments):
    """Run ``examples/<name>`` with ``--out out`` in ``folder``; return the output folder and what it printed."""
    environment = {**os.environ, 'LRP_BRAIN_CACHE': str(folder / 'cache'), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, str(EXAMPLES / name), '--out', 'out', *arguments], cwd=folder,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder / 'out', result.stdout


def open_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == 'PNG'
        image.load()
        return image.size


def test_explain_one_slice(model, tmp_path):
    arguments, size = model
    out, printed = run_example('explain_one_slice.py', tmp_path, *arguments)
    width, height = open_png(out / 'four_panel.png')
    assert width > 2 * height
    relevance = np.load(out / 'relevance.npy')
    assert relevance.shape == (3, size, size) and np.isfinite(relevance).all() and relevance.any()
    iou = float(re.search(r'iou (\d\.\d+)', printed).group(1))
    assert 0 <= iou <= 1
    line = printed.split('probabilities:')[1].splitlines()[0]
    probabilities = [float(value) for value in re.findall(r'\d\.\d+', line)]
    assert sum(probabilities) == pytest.approx(1, abs=2e-3)


def test_zennit_attributors(model, tmp_path):
    arguments, _ = model
    out, printed = run_example('zennit_attributors.py', tmp_path, *arguments, '--n-iter', '2')
    names = ('gradient', 'lrp', 'smoothgrad', 'smooth_lrp')
    side = open_png(out / 'input.png')[0]
    for name in names:
        assert open_png(out / f'{name}.png') == (side, side)
    assert open_png(out / 'all.png') == (len(names) * side, side)
    inside = [float(value) for value in re.findall(r'inside the tumour (\d\.\d+)', printed)]
    assert len(inside) == len(names) and all(0 <= value <= 1 for value in inside)


def test_compare_baselines(model, tmp_path):
    arguments, _ = model
    out, printed = run_example('compare_baselines.py', tmp_path, *arguments, '--n', '9')
    with open(out / 'comparison.csv', newline='') as file:
        rows = list(csv.DictReader(file))
    assert [row['method'] for row in rows] == list(METHODS)
    for row in rows:
        values = {name: float(value) for name, value in row.items() if name != 'method'}
        assert values['images'] == 9
        assert all(math.isfinite(value) for value in values.values())
        assert 0 <= values['iou_ci_low'] <= values['mean_iou'] <= values['iou_ci_high'] <= 1
        assert 0 <= values['mass_accuracy'] <= 1 and 0 <= values['pointing_game'] <= 1
        assert f'{values["mean_iou"]:.3f}' in printed


def test_small_sweep(model, tmp_path):
    arguments, _ = model
    out, printed = run_example('small_sweep.py', tmp_path, *arguments)
    with open(out / 'sweep.csv', newline='') as file:
        rows = list(csv.DictReader(file))
    grid = {(float(row['epsilon']), float(row['gamma'])) for row in rows}
    assert len(rows) == len(grid) == 9
    for row in rows:
        for name in ('val_iou', 'test_iou'):
            assert 0 <= float(row[name]) <= 1
        assert f'{float(row["val_iou"]):.3f}' in printed
    choice = json.loads((out / 'choice.json').read_text())
    best = max(rows, key=lambda row: float(row['val_iou']))
    assert (choice['best']['epsilon'], choice['best']['gamma']) == (float(best['epsilon']), float(best['gamma']))
    assert choice['selected_on'] == 'val'
    open_png(out / 'heatmap.png')


def test_contrastive_zennit(model, tmp_path):
    arguments, size = model
    out, printed = run_example('contrastive_zennit.py', tmp_path, *arguments)
    names = sorted(path.name for path in out.glob('*.png'))
    assert [name.split('-')[0] for name in names] == ['glioma', 'meningioma', 'pituitary']
    for name in names:
        # 3 rows (plain, SGLRP, CLRP) × 3 classes of size × size maps (Zennit's imgify grid, 1 px apart at most)
        width, height = open_png(out / name)
        assert 3 * size <= width <= 3 * size + 4 and 3 * size <= height <= 3 * size + 4
    correlations = {variant: [float(value) for value in re.findall(rf'{variant} maps, mean Spearman between classes '
                                                                    rf'([-+]\d\.\d+)', printed)]
                    for variant in ('plain', 'sglrp', 'clrp')}
    assert all(len(values) == 3 for values in correlations.values())
    assert all(-1 <= value <= 1 for values in correlations.values() for value in values)


def test_contrast_figure(model, tmp_path):
    arguments, _ = model
    out, printed = run_example('contrast_figure.py', tmp_path, *arguments)
    width, height = open_png(out / 'contrast.png')
    assert width > 2.5 * height  # one row per phantom, 1 + 9 panels a row
    for variant in ('plain', 'SGLRP', 'CLRP'):
        assert re.search(rf'{variant}: class sensitivity per phantom( \S+ [-+]\d\.\d+,?){{3}}', printed), variant
