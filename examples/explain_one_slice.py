"""Explain one MRI slice with the Python API: load the demo model, read a Figshare .mat slice, compute its LRP
relevance, score it against the tumour mask and draw the study's four-panel figure.

    python examples/explain_one_slice.py [SLICE.mat] [--checkpoint MODEL.pt] [--out explain_one_slice]

Without SLICE.mat, a few synthetic phantom slices (the Figshare file format, seed 1: never seen by the demo model)
are written to a temporary folder and the first one is explained. Writes four_panel.png and relevance.npy to --out.
"""
import argparse
import os
import tempfile

import numpy as np

from lrp_brain.composites import zbox_bounds
from lrp_brain.data import Transform, read_slice
from lrp_brain.explain import explain
from lrp_brain.figures import four_panel
from lrp_brain.metrics import evaluate_maps, relevance_mask
from lrp_brain.model import load_checkpoint, load_demo_model
from lrp_brain.phantom import write_phantoms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('slice', nargs='?', help='a Figshare .mat slice (default: a synthetic phantom)')
    parser.add_argument('--checkpoint', help='an lrp-brain checkpoint or VGG state dict (default: the demo model)')
    parser.add_argument('--out', default='explain_one_slice', help='output folder (default ./explain_one_slice)')
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint) if args.checkpoint else load_demo_model()
    # the preprocessing the model was trained on: min-max to [0, 1], resized to its input size, 3 channels
    transform = Transform.from_dict(meta['transform'])
    low, high = zbox_bounds(transform)  # the z^B bounds follow from it: the smallest and largest input, 0 and 1

    if args.slice:
        item = read_slice(args.slice)
    else:
        with tempfile.TemporaryDirectory() as folder:
            item = read_slice(write_phantoms(folder, 3, seed=1, sizes=(256,), quiet=True)[0])
    image, mask = transform(item.image, item.mask)  # (3, S, S) in [0, 1] and (S, S) of 0 and 1

    # LRP with the study's composite; the output relevance is 1 at the true class (the study explains the label)
    explanation = explain(model, image[None], target='label', labels=[item.label], epsilon=0.25, gamma=0.1,
                          low=low, high=high)
    relevance = explanation.relevance  # (1, 3, S, S)
    scores = evaluate_maps(relevance, mask[None], quantile=0.9)  # the relevance mask: the top 10 % of pixels

    names = meta['class_names']
    print(f'{os.path.basename(item.path)}: patient {item.patient}, label {names[item.label]}, '
          f'predicted {names[explanation.predictions[0]]}')
    print('probabilities: ' + ', '.join(f'{name} {p:.3f}' for name, p in zip(names, explanation.probabilities[0])))
    print(f'relevance sum {relevance.sum():.3f} (the output relevance was 1 at the explained class)')
    print('metrics: ' + ', '.join(f'{name} {scores[name][0]:.3f}' for name in
                                  ('iou', 'precision', 'recall', 'pointing_game', 'mass_accuracy', 'rank_accuracy')))

    os.makedirs(args.out, exist_ok=True)
    figure = four_panel(os.path.join(args.out, 'four_panel.png'), image, mask, relevance[0],
                        relevance_mask(relevance, 0.9)[0], scores['iou'][0].item(),
                        title=f'{os.path.basename(item.path)}: {names[item.label]}, ε = 0.25, γ = 0.1')
    np.save(os.path.join(args.out, 'relevance.npy'), relevance[0].numpy())
    print(f'wrote {figure} and {os.path.join(args.out, "relevance.npy")}')


if __name__ == '__main__':
    main()
