"""The ``lrp-brain`` command line: thin click commands over the Python API.

Each command parses its arguments, calls the API and prints; no logic lives here.
"""
from contextlib import contextmanager

import click


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(package_name='lrp-brain')
def main():
    """LRP explanations for VGG16 brain-tumour MRI classifiers, and how well they land on the tumour."""


# Commands are added below, one block per command, in the order: explain, evaluate, sweep, train, check, synth,
# data, bench.


def source_options(command):
    """The options that say which model and which data a command works on (shared by explain, evaluate, sweep)."""
    options = [
        click.option('--checkpoint', type=click.Path(exists=True, dir_okay=False),
                     help='An lrp-brain checkpoint or a bare torchvision VGG state dict. Default: the demo model.'),
        click.option('--data', type=click.Path(exists=True),
                     help='A Figshare dataset (folder, zip or .mat). Default: a generated phantom set.'),
        click.option('--split-file', type=click.Path(dir_okay=False),
                     help='The split JSON to reuse (made and saved there if missing).'),
        click.option('--split-method', type=click.Choice(['patient', 'cvind', 'random']), default='patient',
                     show_default=True, help='How a new split is made (random leaks patients: seed study only).'),
        click.option('--split-seed', type=int, default=0, show_default=True, help='Seed of a new split.'),
        click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.'),
        click.option('--batch-size', type=click.IntRange(min=1), default=8, show_default=True),
        click.option('--quiet', is_flag=True, help='No progress bars.'),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@contextmanager
def processes(device):
    """Join the torchrun process group if launched by torchrun (one process otherwise); yield this process's device.
    A ValueError of the body (the project's errors: bad data, checkpoint, parameters) becomes the command's error
    message. Only rank 0 prints results."""
    from lrp_brain import distributed

    try:
        device = distributed.init(device)
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(str(error)) from error
    try:
        yield device
    except BaseException as error:
        distributed.finish(wait=False)  # the others may be elsewhere: no last barrier
        if isinstance(error, ValueError):
            raise click.ClickException(str(error)) from error
        raise
    distributed.finish()


def _echo(message):
    from lrp_brain import distributed

    if distributed.is_main():
        click.echo(message)


# --- explain ------------------------------------------------------------------------------------------------------

@main.command('explain')
@click.argument('inputs', nargs=-1, metavar='[INPUT]...')
@click.option('--checkpoint', type=click.Path(exists=True, dir_okay=False),
              help='An lrp-brain checkpoint or a bare torchvision VGG state dict. Default: the demo model.')
@click.option('--data', type=click.Path(exists=True),
              help='A Figshare dataset (folder, zip or .mat) to take the slices of --index from.')
@click.option('--index', 'indices', type=click.IntRange(min=0), multiple=True,
              help='Position of a slice of --data in file order (0 is 1.mat of a Figshare folder); repeatable.')
@click.option('--eps', 'epsilon', type=float, default=0.25, show_default=True, help='ε of LRP-ε (blocks 4-5).')
@click.option('--gamma', type=float, default=0.1, show_default=True, help='γ of LRP-γ (blocks 1-3).')
@click.option('--target',
              help='label (the true class; the predicted one for an image without label), pred, a class index or '
                   'name, or all (also one map per class). Default: label, and all for the demo phantoms.')
@click.option('--method', type=click.Choice(['lrp', 'gradient', 'gradxinput', 'zennit-egb']), default='lrp',
              show_default=True)
@click.option('--quantile', type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help='The relevance mask keeps the pixels above this quantile (0.9: the top 10 %).')
@click.option('--out', type=click.Path(file_okay=False), default='explanations', show_default=True)
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.')
@click.option('--quiet', is_flag=True, help='No progress bars.')
def explain_command(inputs, checkpoint, data, indices, epsilon, gamma, target, method, quantile, out, device, quiet):
    """Explain single images: Figshare .mat slices, PNG/JPEG images, or slices of --data by --index. Prints the
    prediction with its probabilities and, where the file has a tumour mask, the IoU and the other metrics; writes
    per image <name>.png (four panels), <name>.npy (the relevance, C×H×W float32) and, for --target all,
    <name>.classes.png (one map per class) and <name>.classes.npy (K×C×H×W, row k explaining class k). With no
    INPUT and no --data it explains one phantom slice per class (generated in the cache folder on first use), by
    default with the demo model and --target all."""
    from lrp_brain.explain_files import explain_inputs, gather_inputs
    from lrp_brain.sources import open_model
    from lrp_brain.model import resolve_device

    if (data is None) != (not indices):
        raise click.UsageError('--data and --index go together: --data DIR --index I')
    try:
        source = open_model(checkpoint)
        images = gather_inputs(source.transform, inputs, data, indices, quiet=quiet)
        results = explain_inputs(
            source, images, target or ('label' if inputs or data else 'all'), method=method, epsilon=epsilon,
            gamma=gamma, quantile=quantile, device=resolve_device(device), out=out, progress=not quiet,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    model = checkpoint or 'the demo model'
    click.echo(f'{len(results)} image(s), model {model} ({source.transform.size}×{source.transform.size} input), '
               f'method {method}' + (f' (ε={epsilon:g}, γ={gamma:g})' if method == 'lrp' else '') + '\n')
    for result in results:
        click.echo(result.format())


# --- evaluate -----------------------------------------------------------------------------------------------------

@main.command('evaluate')
@source_options
@click.option('--eps', 'epsilon', type=float, default=0.25, show_default=True, help='ε of LRP-ε (blocks 4-5).')
@click.option('--gamma', type=float, default=0.1, show_default=True, help='γ of LRP-γ (blocks 1-3).')
@click.option('--quantile', type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help='The relevance mask keeps the pixels above this quantile (0.9: the top 10 %).')
@click.option('--split', 'part', type=click.Choice(['test', 'val', 'train']), default='test', show_default=True)
@click.option('--method', type=click.Choice(['lrp', 'gradient', 'gradxinput', 'zennit-egb']), default='lrp',
              show_default=True)
@click.option('--target', type=click.Choice(['label', 'pred']), default='label', show_default=True,
              help='Explain the true class (as the study) or the predicted one.')
@click.option('--figures', type=click.IntRange(min=0), default=3, show_default=True,
              help='Four-panel figures of this many best and worst images.')
@click.option('--out', type=click.Path(file_okay=False), default='evaluation', show_default=True)
def evaluate_command(checkpoint, data, split_file, split_method, split_seed, device, batch_size, quiet, epsilon,
                     gamma, quantile, part, method, target, figures, out):
    """Explain every image of a split and score how well the relevance covers the tumour: writes rows.csv (one row
    per image: file, patient, label, prediction, probabilities, every metric) and summary.json (means, 95 %
    bootstrap CIs, per class, settings, fingerprints, excluded images). A killed run resumes when run again."""
    from lrp_brain.evaluate import evaluate
    from lrp_brain.metrics import METRICS
    from lrp_brain.sources import open_source

    with processes(device) as device:
        source = open_source(checkpoint, data, split_file, split_method, split_seed, quiet=quiet)
        rows, summary = evaluate(
            source, part, method=method, epsilon=epsilon, gamma=gamma, quantile=quantile, target=target,
            batch_size=batch_size, device=device, out=out, progress=not quiet, figures=figures,
        )
        _echo(f'{len(rows)} {part} images, accuracy {summary["accuracy"]:.3f}, method {method}'
              + (f' (ε={epsilon:g}, γ={gamma:g})' if method == 'lrp' else '') + f', quantile {quantile:g}')
        for name in METRICS:
            overall = summary[name]['overall']
            _echo(f'  {name:<15} {overall["mean"]:.4f}  95% CI [{overall["ci_low"]:.4f}, {overall["ci_high"]:.4f}]'
                  f'  n={overall["n"]}  excluded={overall["excluded"]}')
        _echo(f'flags: {summary["flags"]}; wrote {out}/rows.csv and {out}/summary.json')


# --- sweep --------------------------------------------------------------------------------------------------------

def _grid(text, name):
    try:
        return [float(value) for value in text.split(',') if value.strip()]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers, got {text!r}', param_hint=name) from None


@main.command('sweep')
@source_options
@click.option('--eps', 'epsilons', default='0,0.01,0.1,0.25,1', show_default=True,
              help='Comma-separated ε values.')
@click.option('--gamma', 'gammas', default='0,0.01,0.1,0.25,1', show_default=True,
              help='Comma-separated γ values.')
@click.option('--quantile', 'quantiles', default='0.9', show_default=True,
              help='Comma-separated relevance-mask quantiles.')
@click.option('--seed-study', is_flag=True,
              help="Reproduce the seed study's protocol (random file split seed 42, 256 px, quantile 0.95, "
                   'ε and γ in -100..100 step 20) and say why it is biased.')
@click.option('--out', type=click.Path(file_okay=False), default='sweep', show_default=True)
def sweep_command(checkpoint, data, split_file, split_method, split_seed, device, batch_size, quiet, epsilons,
                  gammas, quantiles, seed_study, out):
    """Score every ε×γ (×quantile) setting by mean IoU on the validation split, choose the best there and report
    it (and the whole grid) on the test split. Writes sweep.csv, heatmap.png and choice.json; an interrupted sweep
    resumes when run again with the same arguments."""
    from lrp_brain.sources import open_source
    from lrp_brain.sweep import SEED_STUDY, SEED_STUDY_BIAS, run_sweep

    size, notes = None, None
    epsilons, gammas, quantiles = (_grid(epsilons, '--eps'), _grid(gammas, '--gamma'),
                                   _grid(quantiles, '--quantile'))
    if seed_study:
        epsilons, gammas, quantiles = SEED_STUDY['epsilons'], SEED_STUDY['gammas'], SEED_STUDY['quantiles']
        split_method, split_seed, size = SEED_STUDY['split_method'], SEED_STUDY['split_seed'], SEED_STUDY['size']
        notes = SEED_STUDY_BIAS
    with processes(device) as device:
        if notes:
            _echo(notes)
        source = open_source(checkpoint, data, split_file, split_method, split_seed, size=size, quiet=quiet)
        result = run_sweep(source, epsilons, gammas, quantiles, out=out, batch_size=batch_size, device=device,
                           progress=not quiet, allow_negative=seed_study, notes=notes)
        best = result.best
        _echo(f'{len(result.table)} settings; best on validation: ε={best["epsilon"]:g}, γ={best["gamma"]:g}, '
              f'quantile {best["quantile"]:g}')
        _echo(f'  validation IoU {best["val_iou"]:.4f} [{best["val_iou_ci_low"]:.4f}, {best["val_iou_ci_high"]:.4f}]'
              f' (n={best["val_n"]})')
        _echo(f'  test IoU       {best["test_iou"]:.4f} [{best["test_iou_ci_low"]:.4f}, '
              f'{best["test_iou_ci_high"]:.4f}] (n={best["test_n"]})')
        _echo(f'wrote {out}/sweep.csv, {out}/heatmap.png and {out}/choice.json')


# --- train --------------------------------------------------------------------------------------------------------

@main.command('train')
@click.option('--data', type=click.Path(exists=True),
              help='Dataset: a folder, zip or .mat file of Figshare slices. Default: generated phantoms.')
@click.option('--phantoms', type=click.IntRange(min=1), default=600, show_default=True,
              help='Phantoms to generate (seeded with --seed) when no --data is given.')
@click.option('--arch', default='vgg16', show_default=True, help='vgg11, vgg13, vgg16 or vgg19, optionally _bn.')
@click.option('--width', type=click.IntRange(min=1), default=None,
              help='Channels of the first block of a width-reduced network (default: the full network).')
@click.option('--epochs', type=click.IntRange(min=1), required=True, help='Epochs to have finished at the end.')
@click.option('--out', type=click.Path(dir_okay=False), required=True,
              help='The model file; split, confusion matrix and test results are written beside it.')
@click.option('--size', type=click.IntRange(min=1), default=224, show_default=True, help='Input side in pixels.')
@click.option('--batch-size', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Adam's learning rate.")
@click.option('--split-file', type=click.Path(dir_okay=False),
              help='Split JSON to use (made and saved there if missing). Default: <out stem>.split.json.')
@click.option('--init-weights', type=click.Path(exists=True, dir_okay=False),
              help="Start from torchvision's ImageNet weights file, e.g. vgg16-397923af.pth.")
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.')
@click.option('--seed', type=int, default=0, show_default=True, help='Seeds the split, the weights and training.')
@click.option('--workers', type=click.IntRange(min=0), default=0, show_default=True,
              help='Data loading processes (the result does not depend on them).')
@click.option('--quiet', is_flag=True, help='No progress bars.')
def train_command(data, phantoms, arch, width, epochs, out, size, batch_size, lr, split_file, init_weights, device,
                  seed, workers, quiet):
    """Train a VGG classifier with Adam and random flips on a patient-wise split, keep the model best on validation
    and report it on the test split. Rerunning the same command resumes an interrupted run."""
    from lrp_brain.train import train

    with processes(device) as device:
        result = train(data, out, arch=arch, width=width, epochs=epochs, batch_size=batch_size, lr=lr, size=size,
                       split_file=split_file, seed=seed, device=device, init_weights=init_weights,
                       num_workers=workers, progress=not quiet, phantoms=phantoms)
        if result.resumed_from:
            _echo(f'resumed after epoch {result.resumed_from}')
        _echo(f'best epoch {result.best_epoch} of {result.epochs}: validation accuracy {result.val_accuracy:.4f}')
        _echo(f'test split, {result.test.format()}')
        for name in ('checkpoint', 'resume', 'split', 'confusion', 'test'):
            _echo(f'wrote {result.paths[name]}')


# --- check --------------------------------------------------------------------------------------------------------

@main.command('check')
@click.option('--checkpoint', type=click.Path(exists=True, dir_okay=False),
              help='Model file: an lrp-brain checkpoint or a bare torchvision VGG state dict. Default: the demo model.')
@click.option('--arch', help='Check torchvision\'s network with random weights instead, e.g. vgg16 or vgg16_bn.')
@click.option('--size', type=click.IntRange(min=1), help="Input side in pixels. Default: the model's input size.")
@click.option('--eps', 'epsilon', type=float, default=0.25, show_default=True, help='ε of the LRP-ε layers.')
@click.option('--gamma', type=float, default=0.1, show_default=True, help='γ of the LRP-γ layers.')
@click.option('--seed', type=int, default=0, show_default=True,
              help='Seeds the random probe input (and the random weights of --arch).')
@click.pass_context
def check_command(context, checkpoint, arch, size, epsilon, gamma, seed):
    """Check that a model is safe to explain with LRP: every layer has a rule, the canonizers (BatchNorm merging)
    keep the function and are undone, and the relevance is finite; print the rule table and the relevance
    conservation per layer group. Exits with 1 when the model is not safe to explain."""
    import torch

    from lrp_brain.check import check_model, probe_input
    from lrp_brain.composites import zbox_bounds
    from lrp_brain.model import build_model, default_meta, load_checkpoint, load_demo_model

    if checkpoint and arch:
        raise click.UsageError('give --checkpoint or --arch, not both')
    try:
        if arch:
            torch.manual_seed(seed)
            model, meta = build_model(arch), default_meta(arch=arch)
            source = f'{arch} with random weights (seed {seed})'
        elif checkpoint:
            (model, meta), source = load_checkpoint(checkpoint), checkpoint
        else:
            (model, meta), source = load_demo_model(), 'the demo model'
        low, high = zbox_bounds(meta['transform'])
        size = size or meta['input_size']
        report = check_model(model, probe_input(size, low, high, seed), epsilon=epsilon, gamma=gamma, low=low,
                             high=high)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f'checking {source} on a random input of {size}×{size} pixels (seed {seed})\n')
    click.echo(str(report))
    context.exit(0 if report.ok else 1)


# --- synth --------------------------------------------------------------------------------------------------------

@main.command('synth')
@click.option('--out', type=click.Path(file_okay=False), required=True,
              help='Folder for 1.mat ... N.mat and cvind.mat (created; must hold no .mat files).')
@click.option('--n', 'count', type=click.IntRange(min=1), default=300, show_default=True, help='Slices to write.')
@click.option('--seed', type=int, default=0, show_default=True, help='The same seed writes the same files.')
@click.option('--sizes', default='512,256', show_default=True,
              help='Image sides in pixels, comma-separated; each synthetic patient gets one of them.')
@click.option('--quiet', is_flag=True, help='No progress bar.')
def synth_command(out, count, seed, sizes, quiet):
    """Write synthetic brain-tumour slices (Shepp–Logan phantoms with a meningioma, glioma or pituitary tumour) as
    MATLAB v7.3 files in the Figshare dataset's exact layout, several slices per patient, with a cvind.mat."""
    import time

    from lrp_brain.phantom import write_phantoms

    try:
        sides = tuple(int(side) for side in sizes.split(','))
    except ValueError as error:
        raise click.BadParameter(f'expected comma-separated integers, got {sizes!r}', param_hint='--sizes') from error
    start = time.perf_counter()
    try:
        paths = write_phantoms(out, count, seed=seed, sizes=sides, quiet=quiet)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f'wrote {len(paths)} slices and cvind.mat to {out} in {time.perf_counter() - start:.1f} s '
               f'(seed {seed}, sizes {sizes}); check them with: lrp-brain data {out}')


# --- data ---------------------------------------------------------------------------------------------------------

@main.command('data')
@click.argument('source', type=click.Path(exists=True))
@click.option('--split-file', type=click.Path(dir_okay=False),
              help='A split JSON to check against the data; if missing, the split is made and saved there.')
@click.option('--method', type=click.Choice(['patient', 'cvind', 'random']), default='patient', show_default=True,
              help='How to split when there is no split file: patient-wise stratified (70/15/15), the folds of '
                   'cvind.mat, or the seed study\'s random file split (leaks patients).')
@click.option('--seed', type=int, default=0, show_default=True, help='Seed of the split (the seed study used 42).')
@click.option('--skip-bad', is_flag=True, help='Exit 0 despite bad files; they are left out of the split.')
@click.option('--quiet', is_flag=True, help='No progress bar.')
@click.pass_context
def data_command(context, source, split_file, method, seed, skip_bad, quiet):
    """Validate a Figshare dataset (a folder, zip or .mat file): read every slice once and print the counts per
    class and per patient, the image sizes, the split and every problem found. Exits with 1 when a file is bad,
    unless --skip-bad."""
    from lrp_brain.data import check_dataset, summarise_problems

    try:
        report = check_dataset(source, split_file=split_file, method=method, seed=seed, skip_bad=skip_bad,
                               quiet=quiet)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(report.format())
    if not report.ok and skip_bad:
        click.echo(f'--skip-bad: skipped {summarise_problems(report.fatal_problems)}')
    context.exit(0 if report.ok or skip_bad else 1)


# --- bench --------------------------------------------------------------------------------------------------------

@main.command('bench')
@click.option('--device', default='cpu', show_default=True, help='cpu, cuda, cuda:N or auto.')
@click.option('--batch', type=click.IntRange(min=1), default=1, show_default=True, help='Images per call.')
@click.option('--size', type=click.IntRange(min=32), default=224, show_default=True, help='Image height and width.')
@click.option('--repeats', type=click.IntRange(min=1), default=5, show_default=True,
              help='Timed rounds, one call of every method each.')
@click.option('--warmup', type=click.IntRange(min=0), default=1, show_default=True,
              help='Untimed calls of every method first.')
@click.option('--arch', default='vgg16', show_default=True, help='vgg11, vgg13, vgg16 or vgg19, optionally _bn.')
@click.option('--width', type=click.IntRange(min=1),
              help='A width-reduced model (channels w, 2w, 4w, 8w, 8w) for quick runs. Default: full size.')
@click.option('--seed', type=int, default=0, show_default=True, help='Seed of the weights, images and targets.')
@click.option('--threads', type=click.IntRange(min=1), help='CPU threads of torch. Default: torch\'s own setting.')
@click.option('--no-memory', is_flag=True, help='Skip the peak-memory measurement (one extra call per method).')
@click.option('--quiet', is_flag=True, help='No progress bar.')
def bench_command(device, batch, size, repeats, warmup, arch, width, seed, threads, no_memory, quiet):
    """Time LRP on one VGG with random weights and one batch, method against method: the plain gradient, Zennit's
    EpsilonGammaBox, Zennit's rules in the seed mapping, Captum's LRP (if installed), the project composite and
    one ε×γ sweep step per setting. Prints medians, ratios to the gradient, images/s and peak memory."""
    from lrp_brain.bench import format_bench, run_bench

    try:
        result = run_bench(device=device, batch=batch, size=size, repeats=repeats, arch=arch, width=width, seed=seed,
                           warmup=warmup, memory=not no_memory, threads=threads, quiet=quiet)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(format_bench(result))
