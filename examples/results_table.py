"""The README's results table: LRP settings chosen by each sweep objective against the seed setting and the baselines,
scored on a phantom test split by localisation and by faithfulness, each with its 95 % bootstrap interval.

    python examples/results_table.py [--checkpoint MODEL.pt] [--n 1100] [--out results]

1. A patient-wise split of ``--n`` phantom slices (seed 1, never seen by the demo model; 1100 slices give about 165
   validation and 165 test slices, enough for the intervals to separate where the methods really differ).
2. One ε×γ sweep on the validation split (lrp_brain.sweep.run_sweep), scored by both criteria, chosen three ways:
   by mean IoU, by mean faithfulness gap and by the Pareto rule (the scores are computed once, the later objectives
   resume from the first one's row logs).
3. ``evaluate`` on the test split for the seed setting (ε = 0.25, γ = 0.1), each objective's choice, the gradient,
   gradient × input and Zennit's stock EpsilonGammaBox: IoU, pointing game, MoRF AUC, LeRF AUC and their gap.

Prints the table as Markdown and writes it to --out/results.md (with results.json, every summary).
"""
import argparse
import json
import os

from lrp_brain.evaluate import evaluate
from lrp_brain.phantom import phantom_dataset
from lrp_brain.sources import open_source
from lrp_brain.sweep import run_sweep

EPSILONS = (0., 0.25, 1., 10.)
GAMMAS = (0., 0.1, 0.25, 1.)
COLUMNS = (('iou', 'IoU@0.9'), ('pointing_game', 'pointing game'), ('morf_auc', 'MoRF AUC ↓'),
           ('lerf_auc', 'LeRF AUC ↑'), ('faithfulness_gap', 'gap ↑'))


def cell(summary):
    overall = summary['overall']
    return f'{overall["mean"]:.3f} [{overall["ci_low"]:.3f}, {overall["ci_high"]:.3f}]'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', help='an lrp-brain checkpoint or VGG state dict (default: the demo model)')
    parser.add_argument('--n', type=int, default=1100, help='phantom slices, split 70/15/15 by patient (default 1100)')
    parser.add_argument('--out', default='results', help='output folder (default ./results)')
    args = parser.parse_args()

    source = open_source(args.checkpoint, phantom_dataset(args.n, seed=1, quiet=True), quiet=True)
    print(f'{len(source.split.val)} validation and {len(source.split.test)} test slices')
    methods = [('LRP ε=0.25, γ=0.1 (the seed setting)', 'lrp', 0.25, 0.1)]
    for objective in ('iou', 'faithfulness', 'pareto'):
        best = run_sweep(source, EPSILONS, GAMMAS, out=os.path.join(args.out, 'sweep'), objective=objective,
                         progress=False).best
        methods.append((f'LRP ε={best["epsilon"]:g}, γ={best["gamma"]:g} (sweep, objective {objective})', 'lrp',
                        best['epsilon'], best['gamma']))
    methods += [('gradient', 'gradient', 0.25, 0.1), ('gradient × input', 'gradxinput', 0.25, 0.1),
                ('Zennit stock EpsilonGammaBox', 'zennit-egb', 0.25, 0.1)]

    lines = ['| method | ' + ' | '.join(title for _, title in COLUMNS) + ' |', '|---' * (len(COLUMNS) + 1) + '|']
    summaries = {}
    for name, method, epsilon, gamma in methods:
        _, summary = evaluate(source, 'test', method=method, epsilon=epsilon, gamma=gamma, progress=False)
        summaries[name] = summary
        lines.append(f'| {name} | ' + ' | '.join(cell(summary[column]) for column, _ in COLUMNS) + ' |')
    table = '\n'.join(lines)
    print(f'test split, {summary["images"]} images, mean [95 % CI]:\n{table}')
    with open(os.path.join(args.out, 'results.md'), 'w') as file:
        file.write(table + '\n')
    with open(os.path.join(args.out, 'results.json'), 'w') as file:
        json.dump(summaries, file, indent=1)
    print(f'wrote {os.path.join(args.out, "results.md")} and results.json')


if __name__ == '__main__':
    main()
