"""Draw docs/contrast.png: one demo phantom per class (the slices ``lrp-brain explain`` shows with no input), and for
each the LRP map of every class three ways: plain (one-hot output relevance), SGLRP and CLRP; print each variant's
class sensitivity (the mean Spearman correlation between the classes' maps of an image; 1: one map for all).

    python examples/contrast_figure.py [--checkpoint MODEL.pt] [--out docs] [--eps 0.25] [--gamma 0.1]
"""
import argparse
import os

import torch

from lrp_brain.explain import explain_all_classes
from lrp_brain.explain_files import demo_inputs
from lrp_brain.figures import contrast_figure
from lrp_brain.sanity import compare_classes
from lrp_brain.sources import open_model

VARIANTS = {'plain': None, 'SGLRP': 'sglrp', 'CLRP': 'clrp'}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', help='an lrp-brain checkpoint or VGG state dict (default: the demo model)')
    parser.add_argument('--out', default='docs', help='output folder (default ./docs)')
    parser.add_argument('--eps', type=float, default=0.25, help='ε of LRP-ε (default 0.25)')
    parser.add_argument('--gamma', type=float, default=0.1, help='γ of LRP-γ (default 0.1)')
    args = parser.parse_args()

    source = open_model(args.checkpoint)
    inputs = demo_inputs(source.transform, quiet=True)
    low, high = source.bounds
    maps = {name: [] for name in VARIANTS}
    for item in inputs:
        for name, contrast in VARIANTS.items():
            maps[name].append(explain_all_classes(source.model, item.image, epsilon=args.eps, gamma=args.gamma,
                                                  low=low, high=high, contrast=contrast).relevance)
    for name, per_image in maps.items():
        _, mean = compare_classes([torch.stack([classes[k] for classes in per_image])
                                   for k in range(len(source.class_names))])
        print(f'{name:>5}: class sensitivity per phantom '
              + ', '.join(f'{item.name} {value:+.3f}' for item, value in zip(inputs, mean['spearman'].tolist())))
    os.makedirs(args.out, exist_ok=True)
    path = contrast_figure(
        os.path.join(args.out, 'contrast.png'), torch.stack([item.image for item in inputs]),
        {name: torch.stack(per_image) for name, per_image in maps.items()}, source.class_names,
        masks=torch.stack([item.mask for item in inputs]),
        row_titles=[f'{item.name}\n({source.class_names[item.label]})' for item in inputs],
        title=f'LRP (ε = {args.eps:g}, γ = {args.gamma:g}) of every class: plain, SGLRP, CLRP',
    )
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
