"""Explain a torchvision VGG16 with lrp-brain's composite in plain Zennit code, and save the heatmap.

    python examples/composite_in_zennit.py [WEIGHTS.pth] [--size 64] [--target 0] [--out heatmap.png]

WEIGHTS.pth is an optional local VGG16 state dict (loaded with ``weights_only=True``; the number of classes is read
from it). Without it the network has random weights, which is enough to see the plumbing. The input is a synthetic
[0, 1] image, so the z^B bounds of the first layer are 0 and 1.
"""
import argparse

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import COMPOSITES
from zennit.image import imgify, palette

from lrp_brain.composites import VGGComposite, zbox_bounds  # importing lrp_brain registers 'lrp_brain_vgg'


def synthetic_image(size):
    """A bright disc on a dim gradient, min-max scaled to [0, 1], repeated to 3 channels: shape (1, 3, size, size)."""
    axis = torch.linspace(-1, 1, size)
    row, column = torch.meshgrid(axis, axis, indexing='ij')
    image = .3 * (column + 1) / 2 + ((row - .2) ** 2 + (column + .3) ** 2 < .1).float()
    image = (image - image.min()) / (image.max() - image.min())
    return image.expand(1, 3, size, size).clone()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('weights', nargs='?', help='local VGG16 state dict (.pth); random weights if omitted')
    parser.add_argument('--size', type=int, default=64, help='input height and width (default 64)')
    parser.add_argument('--target', type=int, default=None, help='class to explain (default: the predicted one)')
    parser.add_argument('--out', default='heatmap.png', help='where to write the heatmap PNG (default ./heatmap.png)')
    args = parser.parse_args()

    if args.weights:
        state = torch.load(args.weights, map_location='cpu', weights_only=True)
        model = torchvision.models.vgg16(weights=None, num_classes=state['classifier.6.weight'].shape[0])
        model.load_state_dict(state)
    else:
        torch.manual_seed(0)
        model = torchvision.models.vgg16(weights=None, num_classes=3)
    model.eval()

    image = synthetic_image(args.size)
    low, high = zbox_bounds({'value_range': (0., 1.)})  # the input is min-max scaled to [0, 1]

    # the composite is a class of lrp_brain, and also a name in Zennit's registry: the two are the same
    composite_class = COMPOSITES['lrp_brain_vgg']
    assert composite_class is VGGComposite
    composite = composite_class(epsilon=0.25, gamma=0.1, low=low, high=high)

    with torch.no_grad():
        logits = model(image)
    target = args.target if args.target is not None else logits.argmax(dim=1).item()
    one_hot = torch.eye(logits.shape[1])[[target]]  # Zennit's output relevance: 1 at the explained class
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(image, one_hot)

    heatmap = relevance[0].sum(dim=0)  # (H, W): relevance summed over the colour channels
    image = imgify(heatmap, symmetric=True, cmap='coldnhot')  # a paletted PIL image, 0 relevance in the middle colour
    # Zennit hands Pillow its palette as a numpy array, which Pillow 13 cannot save; give it the same palette as bytes
    image.putpalette(palette('coldnhot').tobytes())
    image.save(args.out)
    print(f'class {target} (logit {output[0, target]:.3g}); relevance sum {heatmap.sum():.3g}; wrote {args.out}')


if __name__ == '__main__':
    main()
