"""Class-contrastive LRP with plain Zennit: lrp-brain's output-relevance helpers as a Zennit attributor's
``attr_output``, with Zennit's own EpsilonGammaBox composite on the demo model.

    python examples/contrastive_zennit.py [--checkpoint MODEL.pt] [--out contrastive_zennit]

``attr_output(targets, 'sglrp')`` starts the relevance pass from the softmax gradient (SGLRP, normalised so that a
confident model gives no vanishing map), ``attr_output(targets, 'clrp')`` from the target minus the other classes
(CLRP), whose input relevance then keeps its positive part (``input_relevance``). For one demo phantom per class it
explains every class three ways, prints how much the maps of different classes correlate (Spearman; 1: one map for
all) and writes <phantom>.png, the maps side by side.
"""
import argparse
import os

import torch
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox
from zennit.image import imgify, palette

from lrp_brain.composites import zbox_bounds
from lrp_brain.contrast import attr_output, input_relevance
from lrp_brain.data import Transform
from lrp_brain.explain_files import demo_inputs
from lrp_brain.model import load_checkpoint, load_demo_model
from lrp_brain.sanity import spearman

COLOUR_MAP = 'coldnhot'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', help='an lrp-brain checkpoint or VGG state dict (default: the demo model)')
    parser.add_argument('--out', default='contrastive_zennit', help='output folder (default ./contrastive_zennit)')
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint) if args.checkpoint else load_demo_model()
    model.eval()
    transform = Transform.from_dict(meta['transform'])
    low, high = zbox_bounds(transform)
    classes = len(meta['class_names'])
    os.makedirs(args.out, exist_ok=True)
    for item in demo_inputs(transform, quiet=True):
        images = item.image[None].repeat(classes, 1, 1, 1)  # one copy per class to explain
        targets = torch.arange(classes)
        rows = []
        for contrast in (None, 'sglrp', 'clrp'):
            with Gradient(model, EpsilonGammaBox(low=low, high=high)) as attributor:
                _, relevance = attributor(images, attr_output(targets, contrast))
            maps = input_relevance(relevance, contrast).sum(1)  # (K, H, W)
            pairs = [(i, j) for i in range(classes) for j in range(i + 1, classes)]
            correlation = torch.stack([spearman(maps[i].flatten()[None], maps[j].flatten()[None])[0]
                                       for i, j in pairs]).mean()
            print(f'{item.name}: {contrast or "plain":>5} maps, mean Spearman between classes {correlation:+.3f}')
            rows.append(maps / maps.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-30))
        image = imgify(torch.cat(rows), symmetric=True, cmap=COLOUR_MAP, grid=(3, classes))
        image.putpalette(palette(COLOUR_MAP).tobytes())  # Pillow 13 wants the palette as bytes
        image.save(os.path.join(args.out, f'{item.name}.png'))
    print(f'wrote one <phantom>.png per class to {args.out} (rows: plain, SGLRP, CLRP; columns: '
          f'{", ".join(meta["class_names"])})')


if __name__ == '__main__':
    main()
