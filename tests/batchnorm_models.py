"""Small VGG16-topology models with random BatchNorm statistics and biases, and their inputs, for the canonizer and
model-check tests."""
import torch
from torch import nn

from lrp_brain.model import vgg16_small


def randomize(model, seed=0):
    """Give every BatchNorm random statistics and affine parameters and every bias a random value, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(.5, 1.5, generator=generator)
                module.bias.normal_(0., .2, generator=generator)
                module.running_mean.normal_(0., .3, generator=generator)
                module.running_var.uniform_(.5, 2., generator=generator)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.normal_(0., .05, generator=generator)
    return model


def small_vgg(batch_norm=False, seed=0):
    torch.manual_seed(seed)
    return randomize(vgg16_small(width=4, num_classes=3, batch_norm=batch_norm), seed).double().eval()


def images(batch=2, size=32, seed=3):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def state(model):
    """A copy of ``model``'s state dict."""
    return {key: value.clone() for key, value in model.state_dict().items()}
