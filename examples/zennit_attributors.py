"""Use lrp-brain's VGGComposite with Zennit's own attributors on the demo model: the plain gradient, LRP (Gradient
with the composite), SmoothGrad, and SmoothGrad through the composite (LRP averaged over noisy copies), each drawn as
a heatmap with zennit.image.imgify.

    python examples/zennit_attributors.py [--checkpoint MODEL.pt] [--out zennit_attributors] [--n-iter 10]

The slice is a synthetic phantom (seed 1, never seen by the demo model). Writes input.png, one <attributor>.png per
attributor and all.png (the four side by side, each scaled to its own largest magnitude) to --out, and prints how
much of each map's positive relevance lies inside the tumour.
"""
import argparse
import os
import tempfile

import torch
from PIL import Image
from zennit.attribution import Gradient, SmoothGrad
from zennit.image import imgify, palette

from lrp_brain.composites import VGGComposite, zbox_bounds
from lrp_brain.data import Transform, read_slice
from lrp_brain.metrics import mass_accuracy
from lrp_brain.model import load_checkpoint, load_demo_model
from lrp_brain.phantom import write_phantoms

COLOUR_MAP = 'coldnhot'
#: Small inputs (the demo model's) are enlarged to at least this many pixels a side, each pixel a square block.
SHOWN_SIDE = 256


def save(image, path):
    """Write a PIL image, enlarged by a whole factor (nearest neighbour) when it is small."""
    zoom = max(1, SHOWN_SIDE // min(image.size))
    image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(path)


def save_heatmap(path, heatmaps, **grid):
    """Write (H, W) relevance, or (N, H, W) as a grid, with 0 in the colour map's middle colour."""
    image = imgify(heatmaps, symmetric=True, cmap=COLOUR_MAP, **grid)
    # Zennit hands Pillow its palette as a numpy array, which Pillow 13 cannot save; give it the same palette as bytes
    image.putpalette(palette(COLOUR_MAP).tobytes())
    save(image, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', help='an lrp-brain checkpoint or VGG state dict (default: the demo model)')
    parser.add_argument('--out', default='zennit_attributors', help='output folder (default ./zennit_attributors)')
    parser.add_argument('--n-iter', type=int, default=10, help='noisy copies SmoothGrad averages (default 10)')
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint) if args.checkpoint else load_demo_model()
    transform = Transform.from_dict(meta['transform'])
    with tempfile.TemporaryDirectory() as folder:
        item = read_slice(write_phantoms(folder, 3, seed=1, sizes=(256,), quiet=True)[0])
    image, mask = transform(item.image, item.mask)
    image = image[None]  # (1, 3, S, S) in [0, 1]

    low, high = zbox_bounds(transform)
    composite = VGGComposite(epsilon=0.25, gamma=0.1, low=low, high=high)
    # Zennit's attributors take the composite as an argument: with it the gradient becomes the LRP relevance
    attributors = {
        'gradient': Gradient(model),
        'lrp': Gradient(model, composite),
        'smoothgrad': SmoothGrad(model, noise_level=0.1, n_iter=args.n_iter),
        # the noisy copies leave [0, 1], so the composite takes each copy's own z^B box (low=None, high=None)
        'smooth_lrp': SmoothGrad(model, VGGComposite(epsilon=0.25, gamma=0.1), noise_level=0.1, n_iter=args.n_iter),
    }
    one_hot = torch.eye(len(meta['class_names']))[[item.label]]  # output relevance: 1 at the true class

    os.makedirs(args.out, exist_ok=True)
    save(imgify(image[0], vmin=0., vmax=1.), os.path.join(args.out, 'input.png'))
    torch.manual_seed(0)  # SmoothGrad's noise
    heatmaps = {}
    for name, attributor in attributors.items():
        with attributor:  # registers the composite (if any) on the model, and removes it on leaving
            _, relevance = attributor(image, one_hot)
        heatmaps[name] = relevance[0].sum(dim=0)  # (S, S): summed over the colour channels
        save_heatmap(os.path.join(args.out, f'{name}.png'), heatmaps[name])
        inside = mass_accuracy(heatmaps[name], mask)[0]
        print(f'{name:>10}: relevance sum {heatmaps[name].sum():+.3g}, positive relevance inside the tumour '
              f'{inside:.3f} (the tumour is {mask.mean():.3f} of the image)')
    save_heatmap(os.path.join(args.out, 'all.png'), torch.stack(list(heatmaps.values())), grid=(1, len(heatmaps)))
    print(f'{item.class_name} phantom {os.path.basename(item.path)}; wrote input.png, '
          f'{", ".join(f"{name}.png" for name in heatmaps)} and all.png to {args.out}')


if __name__ == '__main__':
    main()
