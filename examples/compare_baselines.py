"""Compare LRP with the baselines on a few phantom slices: how much of each method's relevance lands on the tumour.

    python examples/compare_baselines.py [--checkpoint MODEL.pt] [--n 24] [--out compare_baselines]

Methods (see lrp_brain.explain): LRP with the study's composite (ε = 0.25, γ = 0.1), the gradient, gradient × input,
and Zennit's stock EpsilonGammaBox composite. Every map explains the slice's true class and is scored against the
tumour mask; the table gives the mean IoU of the top 10 % of pixels with its 95 % bootstrap interval, the share of
positive relevance inside the tumour and the pointing game. The slices are synthetic phantoms (seed 1, never seen by
the demo model). Writes comparison.csv to --out.
"""
import argparse
import csv
import os
import tempfile

import torch

from lrp_brain.composites import zbox_bounds
from lrp_brain.data import SliceDataset, Transform, find_slices
from lrp_brain.explain import METHODS, explain
from lrp_brain.metrics import evaluate_maps, summarize
from lrp_brain.model import load_checkpoint, load_demo_model
from lrp_brain.phantom import write_phantoms

QUANTILE = 0.9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', help='an lrp-brain checkpoint or VGG state dict (default: the demo model)')
    parser.add_argument('--n', type=int, default=24, help='phantom slices to compare on (default 24)')
    parser.add_argument('--out', default='compare_baselines', help='output folder (default ./compare_baselines)')
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint) if args.checkpoint else load_demo_model()
    transform = Transform.from_dict(meta['transform'])
    low, high = zbox_bounds(transform)
    with tempfile.TemporaryDirectory() as folder:
        write_phantoms(folder, args.n, seed=1, sizes=(256,), quiet=True)
        items = list(SliceDataset(find_slices(folder), transform))  # read (and preprocessed) while the files exist
    images = torch.stack([item['image'] for item in items])  # (N, 3, S, S)
    masks = torch.stack([item['mask'] for item in items])  # (N, S, S)
    labels = torch.tensor([item['label'] for item in items])

    rows = []
    for method in METHODS:
        explanation = explain(model, images, target='label', labels=labels, method=method, epsilon=0.25, gamma=0.1,
                              low=low, high=high)
        scores = evaluate_maps(explanation.relevance, masks, QUANTILE)
        iou = summarize(scores['iou'])['overall']
        rows.append({
            'method': method, 'images': len(items), 'mean_iou': iou['mean'], 'iou_ci_low': iou['ci_low'],
            'iou_ci_high': iou['ci_high'], 'mass_accuracy': scores['mass_accuracy'].nanmean().item(),
            'pointing_game': scores['pointing_game'].nanmean().item(),
        })
    accuracy = (explanation.predictions == labels).double().mean().item()

    print(f'{len(items)} phantom slices, model accuracy {accuracy:.3f}; relevance mask: the top '
          f'{100 * (1 - QUANTILE):.0f} % of pixels')
    print(f'{"method":<12} {"mean IoU":>9}  {"95 % CI":<17} {"mass in tumour":>14} {"pointing game":>14}')
    for row in rows:
        print(f'{row["method"]:<12} {row["mean_iou"]:>9.3f}  [{row["iou_ci_low"]:.3f}, {row["iou_ci_high"]:.3f}]'
              f'    {row["mass_accuracy"]:>14.3f} {row["pointing_game"]:>14.3f}')

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'comparison.csv')
    with open(path, 'w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
