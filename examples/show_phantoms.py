"""Draw one synthetic phantom per class with its tumour outline: the README's docs/phantoms.png.

The slices are written to a temporary folder in the Figshare format and read back with the dataset reader, so the
figure shows exactly what the models see on disk (``tumorBorder`` is drawn; MATLAB's coordinates are 1-based).

    python examples/show_phantoms.py [--out docs/phantoms.png] [--seed 0]
"""
import argparse
import os
import tempfile

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from lrp_brain.data import CLASS_NAMES, find_slices, read_slice  # noqa: E402
from lrp_brain.phantom import write_phantoms  # noqa: E402


def first_of_each_class(folder):
    """The first slice of each class, in class order."""
    chosen = {}
    for ref in find_slices(folder):
        item = read_slice(ref)
        chosen.setdefault(item.label, item)
        if len(chosen) == len(CLASS_NAMES):
            return [chosen[label] for label in range(len(CLASS_NAMES))]
    raise SystemExit(f'not every class among the phantoms of {folder}; write more')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'docs', 'phantoms.png'))
    parser.add_argument('--seed', type=int, default=0)
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        write_phantoms(folder, 30, seed=arguments.seed, sizes=(256,), quiet=True)
        slices = first_of_each_class(folder)

    figure, axes = plt.subplots(2, 3, figsize=(9, 6.4), constrained_layout=True)
    for column, item in enumerate(slices):
        axes[0, column].imshow(item.image, cmap='gray')
        axes[0, column].plot(item.border[:, 0] - 1, item.border[:, 1] - 1, color='tab:red', linewidth=1)
        axes[0, column].set_title(f'{item.class_name} (label {item.label + 1})')
        axes[1, column].imshow(item.mask, cmap='gray', vmin=0, vmax=1)
        axes[1, column].set_title(f'tumorMask, patient {item.patient}', fontsize=9)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.suptitle(f'Synthetic Figshare slices (lrp-brain synth --n 30 --sizes 256 --seed {arguments.seed}): '
                    f'image with tumorBorder, and tumorMask')
    os.makedirs(os.path.dirname(os.path.abspath(arguments.out)), exist_ok=True)
    figure.savefig(arguments.out, dpi=80)
    print(f'wrote {arguments.out}')


if __name__ == '__main__':
    main()
