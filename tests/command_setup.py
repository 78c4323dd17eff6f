"""What the tests of the commands (evaluate, sweep, torchrun) run on: a phantom set and a small VGG16 checkpoint,
and a way to run a command in another process, alone or under torchrun."""
import csv
import os
import subprocess
import sys

import torch

from lrp_brain.data import Transform
from lrp_brain.model import default_meta, save_checkpoint, vgg16_small
from lrp_brain.phantom import write_phantoms

#: The script of jobs tests start in other processes (see its docstring).
JOBS = os.path.join(os.path.dirname(__file__), 'jobs.py')

#: Processes run with the one thread torchrun gives each of its workers, so the thread count never differs.
ENVIRONMENT = {**os.environ, 'OMP_NUM_THREADS': '1'}


def write_setup(folder, phantoms=40, data_seed=5, model_seed=0, size=32, he_init=False):
    """Write ``phantoms`` phantoms (64 px; none for 0) to ``folder/phantoms`` and a width-4 VGG16 for ``size`` px
    input to ``folder/model.pt``; return both paths as strings.

    ``he_init`` draws the weights with He initialisation and the biases from N(0, 0.05²), which keeps the relevance
    well above rounding level through all 16 layers.
    """
    data = folder / 'phantoms'
    if phantoms:
        write_phantoms(data, phantoms, seed=data_seed, sizes=(64,), quiet=True)
    torch.manual_seed(model_seed)
    model = vgg16_small(width=4)
    if he_init:
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight)
                torch.nn.init.normal_(module.bias, std=0.05)
    meta = {**default_meta('vgg16', 4), 'transform': Transform(size=size).to_dict(), 'input_size': size}
    checkpoint = folder / 'model.pt'
    save_checkpoint(checkpoint, model, meta)
    return str(data), str(checkpoint)


def read_csv(path):
    """The rows of a CSV file as dicts of strings."""
    with open(path) as file:
        return list(csv.DictReader(file))


def run(arguments, processes=None, check=True):
    """Run ``python ARGUMENTS`` as one process, or under torchrun with ``processes`` processes on this machine."""
    launcher = [] if processes is None else \
        ['-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={processes}']
    result = subprocess.run([sys.executable, *launcher, *arguments], capture_output=True, text=True,
                            env=ENVIRONMENT, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result
