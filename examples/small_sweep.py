"""Run a small ε×γ sweep of the LRP composite on the demo model, and read its CSV back.

    python examples/small_sweep.py [--checkpoint MODEL.pt] [--n 40] [--out small_sweep]

The sweep explains every validation and test slice for every (ε, γ) of a 3×3 grid, chooses the setting with the
best mean validation IoU and reports it on the test split (lrp_brain.sweep.run_sweep, as ``lrp-brain sweep``). The
data are synthetic phantoms (seed 1, never seen by the demo model), split patient-wise. Writes sweep.csv (one row per
setting), heatmap.png and choice.json to --out, then reads sweep.csv with the csv module and prints the grid.
"""
import argparse
import csv
import json
import os

from lrp_brain.sources import open_source
from lrp_brain.phantom import phantom_dataset
from lrp_brain.sweep import run_sweep

EPSILONS = (0.01, 0.25, 1.)
GAMMAS = (0., 0.1, 0.25)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', help='an lrp-brain checkpoint or VGG state dict (default: the demo model)')
    parser.add_argument('--n', type=int, default=40, help='phantom slices, split 70/15/15 by patient (default 40)')
    parser.add_argument('--out', default='small_sweep', help='output folder (default ./small_sweep)')
    args = parser.parse_args()

    # the phantoms are written to the cache folder once and reused by later runs
    source = open_source(args.checkpoint, phantom_dataset(args.n, seed=1, sizes=(256,), quiet=True), quiet=True)
    result = run_sweep(source, EPSILONS, GAMMAS, quantiles=(0.9,), out=args.out, progress=False)
    print(f'{len(source.split.val)} validation and {len(source.split.test)} test slices; best on validation: '
          f'ε = {result.best["epsilon"]:g}, γ = {result.best["gamma"]:g}, test IoU {result.best["test_iou"]:.3f}')

    # sweep.csv holds one row per setting: ε, γ, quantile, and per split the mean IoU with its interval and the
    # means of the other metrics; plain text, read here as a researcher would in any tool
    with open(os.path.join(args.out, 'sweep.csv'), newline='') as file:
        rows = list(csv.DictReader(file))
    val_iou = {(float(row['epsilon']), float(row['gamma'])): float(row['val_iou']) for row in rows}
    print(f'\nmean validation IoU ({len(rows)} settings from sweep.csv; rows ε, columns γ)')
    print('ε \\ γ  ' + ''.join(f'{gamma:>8g}' for gamma in GAMMAS))
    for epsilon in EPSILONS:
        print(f'{epsilon:<7g}' + ''.join(f'{val_iou[epsilon, gamma]:>8.3f}' for gamma in GAMMAS))

    with open(os.path.join(args.out, 'choice.json')) as file:
        choice = json.load(file)
    test_iou = choice['test']['iou']['overall']
    print(f'\nchoice.json: {choice["best"]}, chosen on {choice["selected_on"]}, test IoU {test_iou["mean"]:.3f} '
          f'[{test_iou["ci_low"]:.3f}, {test_iou["ci_high"]:.3f}]; heatmap in {os.path.join(args.out, "heatmap.png")}')


if __name__ == '__main__':
    main()
