"""The ``lrp-brain`` command line: thin click commands over the Python API.

Each command parses its arguments, calls the API and prints; no logic lives here.
"""
import codecs
import sys
from contextlib import contextmanager

import click


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(package_name='lrp-brain')
def main():
    """LRP explanations for VGG16 brain-tumour MRI classifiers, and how well they land on the tumour."""
    _print_any_file_name()


def _print_any_file_name():
    """Let the output streams print every file name: a name that is not valid UTF-8 reaches Python as surrogates
    (``os.fsdecode``), which a strict stream refuses with a UnicodeEncodeError. A UTF-8 stream writes them back as the
    name's own bytes; any other escapes what it cannot encode."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):
            utf8 = codecs.lookup(stream.encoding or 'ascii').name == 'utf-8'
            stream.reconfigure(errors='surrogateescape' if utf8 else 'backslashreplace')


# Commands are added below, one block per command, in the order: explain, evaluate, sweep, train, check, sanity,
# synth, import, data, bench.


def source_options(command):
    """The options that say which model and which data a command works on (shared by explain, evaluate, sweep)."""
    options = [
        click.option('--checkpoint', type=click.Path(exists=True, dir_okay=False),
                     help='An lrp-brain checkpoint or a bare torchvision VGG state dict. Default: the demo model.'),
        click.option('--data', type=click.Path(exists=True),
                     help='A Figshare dataset (folder, zip or .mat) or an image folder (one subfolder per class). '
                          'Default: a generated phantom set.'),
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


def perturbation_options(command):
    """The options of the faithfulness measure, region perturbation (shared by explain, evaluate, sweep)."""
    options = [
        click.option('--patch-size', type=click.IntRange(min=1), default=8, show_default=True,
                     help='Side of the square patches region perturbation replaces, in pixels.'),
        click.option('--steps', type=click.IntRange(min=1), default=16, show_default=True,
                     help='Perturbation steps of the MoRF and LeRF curves (one patch each).'),
        click.option('--baseline', default='mean', show_default=True,
                     help='What a replaced patch becomes: mean, uniform, blur, inpaint or a number.'),
        click.option('--score', type=click.Choice(['logit', 'probability']), default='logit', show_default=True,
                     help='The score of the explained class the curves follow.'),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def contrast_option(command):
    """``--contrast``: the output relevance the maps start from (shared by explain, evaluate, sweep, sanity)."""
    return click.option(
        '--contrast', type=click.Choice(['none', 'sglrp', 'clrp']), default='none', show_default=True,
        help='Class-contrastive maps: sglrp (softmax-gradient LRP, normalised by p(1 - p)) or clrp (the target minus '
             'the other classes, positive part); the gradient takes sglrp only.',
    )(command)


def _contrast(contrast):
    return None if contrast == 'none' else contrast


def _perturbation(patch_size, steps, baseline, score):
    """The region-perturbation settings of the options (a numeric --baseline as a number)."""
    try:
        baseline = float(baseline)
    except ValueError:
        pass
    return {'patch_size': patch_size, 'steps': steps, 'baseline': baseline, 'score': score}


def _summary_line(name, overall):
    return (f'  {name:<17} {overall["mean"]:.4f}  95% CI [{overall["ci_low"]:.4f}, {overall["ci_high"]:.4f}]'
            f'  n={overall["n"]}  excluded={overall["excluded"]}')


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
              help='A Figshare dataset (folder, zip or .mat) or an image folder to take the slices of --index from.')
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
@perturbation_options
@contrast_option
@click.option('--out', type=click.Path(file_okay=False), default='explanations', show_default=True)
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.')
@click.option('--quiet', is_flag=True, help='No progress bars.')
def explain_command(inputs, checkpoint, data, indices, epsilon, gamma, target, method, quantile, patch_size, steps,
                    baseline, score, contrast, out, device, quiet):
    """Explain single images: Figshare .mat slices, PNG/JPEG images, or slices of --data by --index. Prints the
    prediction with its probabilities, the faithfulness gap of the map (region perturbation: LeRF − MoRF AUC) and,
    where the file has a tumour mask, the IoU and the other metrics; writes
    per image <name>.png (four panels), <name>.npy (the relevance, C×H×W float32) and, for --target all,
    <name>.classes.png (one map per class) and <name>.classes.npy (K×C×H×W, row k explaining class k). <name> is
    the input's file name, or, for several inputs, its path below their common folder with / written %2F (a/x.png
    and b/x.png: a%2Fx.png and b%2Fx.png), so no output overwrites another; a file given twice is refused. With no
    INPUT and no --data it explains one phantom slice per class (generated in the cache folder on first use), by
    default with the demo model and --target all. --target all also prints the class sensitivity (the mean Spearman
    correlation between the classes' maps); with --contrast sglrp or clrp every map is class-contrastive."""
    from lrp_brain.explain_files import explain_inputs, gather_inputs
    from lrp_brain.sources import open_model
    from lrp_brain.model import resolve_device

    if (data is None) != (not indices):
        raise click.UsageError('--data and --index go together: --data DIR --index I')
    try:
        source = open_model(checkpoint)
        images = gather_inputs(source.transform, inputs, data, indices, quiet=quiet, class_names=source.class_names)
        results = explain_inputs(
            source, images, target or ('label' if inputs or data else 'all'), method=method, epsilon=epsilon,
            gamma=gamma, quantile=quantile, device=resolve_device(device), out=out, progress=not quiet,
            perturbation=_perturbation(patch_size, steps, baseline, score), contrast=_contrast(contrast),
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    model = checkpoint or 'the demo model'
    click.echo(f'{len(results)} image(s), model {model} ({source.transform.size}×{source.transform.size} input), '
               f'method {method}' + (f' (ε={epsilon:g}, γ={gamma:g})' if method == 'lrp' else '')
               + (f', contrast {contrast}' if _contrast(contrast) else '') + '\n')
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
@click.option('--metrics', 'criteria', type=click.Choice(['both', 'localisation', 'faithfulness']), default='both',
              show_default=True, help='Localisation against the tumour mask, faithfulness by region perturbation, '
                                      'or both.')
@perturbation_options
@contrast_option
@click.option('--out', type=click.Path(file_okay=False), default='evaluation', show_default=True)
def evaluate_command(checkpoint, data, split_file, split_method, split_seed, device, batch_size, quiet, epsilon,
                     gamma, quantile, part, method, target, figures, criteria, patch_size, steps, baseline, score,
                     contrast, out):
    """Explain every image of a split and score how well the relevance covers the tumour and how faithful it is to
    the model (region perturbation: MoRF and LeRF AUC and their gap): writes rows.csv (one row per image: file,
    patient, label, prediction, probabilities, every metric) and summary.json (means, 95 % bootstrap CIs, per class,
    settings, fingerprints, excluded images). A killed run resumes when run again."""
    from lrp_brain.evaluate import evaluate
    from lrp_brain.faithfulness import COLUMNS
    from lrp_brain.metrics import METRICS
    from lrp_brain.sources import open_source

    with processes(device) as device:
        source = open_source(checkpoint, data, split_file, split_method, split_seed, quiet=quiet)
        rows, summary = evaluate(
            source, part, method=method, epsilon=epsilon, gamma=gamma, quantile=quantile, target=target,
            batch_size=batch_size, device=device, out=out, progress=not quiet, figures=figures, criteria=criteria,
            perturbation=_perturbation(patch_size, steps, baseline, score), contrast=_contrast(contrast),
        )
        _echo(f'{len(rows)} {part} images, accuracy {summary["accuracy"]:.3f}, method {method}'
              + (f' (ε={epsilon:g}, γ={gamma:g})' if method == 'lrp' else '')
              + (f', contrast {contrast}' if _contrast(contrast) else '') + f', quantile {quantile:g}')
        for name in METRICS + COLUMNS:
            if name in summary:
                _echo(_summary_line(name, summary[name]['overall']))
        if 'flags' in summary:
            _echo(f'flags: {summary["flags"]}')
        _echo(f'wrote {out}/rows.csv and {out}/summary.json')


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
@click.option('--objective', type=click.Choice(['iou', 'faithfulness', 'pareto']), default='iou', show_default=True,
              help='Choose by mean validation IoU, by mean faithfulness gap, or among the settings no other beats on '
                   'both (pareto: the one whose worse criterion, scaled over the grid, is best).')
@click.option('--metrics', 'criteria', type=click.Choice(['both', 'localisation', 'faithfulness']), default='both',
              show_default=True, help='What is scored (faithfulness alone for data without tumour masks).')
@click.option('--race', is_flag=True,
              help='Race the settings on validation: after each round of batches, settings another one beats with '
                   'confidence (paired t, Bonferroni over rounds and rivals) leave and are no longer computed; test '
                   'is scored for the chosen setting only.')
@click.option('--confidence', type=float, default=0.95, show_default=True,
              help='With --race: the chance that a setting as good as every other ever leaves is at most 1 - this.')
@click.option('--round-batches', type=click.IntRange(min=1), default=1, show_default=True,
              help='With --race: batches per round (under torchrun, a multiple of the processes).')
@perturbation_options
@contrast_option
@click.option('--out', type=click.Path(file_okay=False), default='sweep', show_default=True)
def sweep_command(contrast, checkpoint, data, split_file, split_method, split_seed, device, batch_size, quiet,
                  epsilons, gammas, quantiles, seed_study, objective, criteria, patch_size, steps, baseline, score, out,
                  race, confidence, round_batches):
    """Score every ε×γ (×quantile) setting on the validation split by mean IoU and by faithfulness (the gap between
    the LeRF and the MoRF AUC of region perturbation), choose one there by --objective and report it (and the whole
    grid) on the test split. Writes sweep.csv, heatmap.png (each criterion side by side) and choice.json; an
    interrupted sweep resumes when run again with the same arguments."""
    from lrp_brain.sources import open_source
    from lrp_brain.sweep import SEED_STUDY, SEED_STUDY_BIAS, merge_grid, run_sweep

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
        for name, values in (('--eps', epsilons), ('--gamma', gammas), ('--quantile', quantiles)):
            note = merge_grid(name, values)[1]
            if note:
                _echo(note)
        source = open_source(checkpoint, data, split_file, split_method, split_seed, size=size, quiet=quiet)
        result = run_sweep(source, epsilons, gammas, quantiles, out=out, batch_size=batch_size, device=device,
                           progress=not quiet, allow_negative=seed_study, notes=notes, objective=objective,
                           criteria=criteria, perturbation=_perturbation(patch_size, steps, baseline, score),
                           race=race, confidence=confidence, round_batches=round_batches, contrast=_contrast(contrast))
        best, choice = result.best, result.choice
        _echo(f'{len(result.table)} settings; chosen on validation by {objective}: ε={best["epsilon"]:g}, '
              f'γ={best["gamma"]:g}, quantile {best["quantile"]:g}')
        for part, summaries in (('validation', choice['validation']), ('test', choice['test'])):
            for name in ('iou', 'faithfulness_gap'):
                if name in summaries:
                    _echo(f'  {part:<10} ' + _summary_line(name, summaries[name]['overall']).lstrip())
        if 'pareto_front' in choice:
            _echo(f'  Pareto front: {len(choice["pareto_front"])} settings (listed in choice.json)')
        if 'race' in choice:
            record = choice['race']
            _echo(f'  race: {record["stayed"]} of {len(result.table)} settings stayed after {record["rounds"]} rounds; '
                  f'{record["evaluations"]["total"]} of {record["full_grid_evaluations"]["total"]} (image, setting) '
                  f'evaluations ({100 * record["fraction_of_full_grid"]:.0f} %)')
        _echo(f'wrote {out}/sweep.csv, {out}/heatmap.png and {out}/choice.json')


# --- train --------------------------------------------------------------------------------------------------------

@main.command('train')
@click.option('--data', type=click.Path(exists=True),
              help='Dataset: a folder, zip or .mat file of Figshare slices, or an image folder (one subfolder per '
                   'class). Default: generated phantoms.')
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


# --- sanity -------------------------------------------------------------------------------------------------------

@main.command('sanity')
@source_options
@click.option('--eps', 'epsilon', type=float, default=0.25, show_default=True, help='ε of LRP-ε (blocks 4-5).')
@click.option('--gamma', type=float, default=0.1, show_default=True, help='γ of LRP-γ (blocks 1-3).')
@click.option('--split', 'part', type=click.Choice(['test', 'val', 'train']), default='test', show_default=True)
@click.option('--count', type=click.IntRange(min=1), default=16, show_default=True,
              help='How many images of the split (its first ones).')
@click.option('--seed', type=int, default=0, show_default=True, help='Seeds the randomised weights.')
@contrast_option
@click.option('--out', type=click.Path(file_okay=False), default='sanity', show_default=True)
def sanity_command(checkpoint, data, split_file, split_method, split_seed, device, batch_size, quiet, epsilon, gamma,
                   part, count, seed, contrast, out):
    """Sanity checks of the maps: the cascading model-parameter randomisation test (Adebayo et al. 2018; the weights
    re-initialised from the last layer group down, each map compared with the original one by Spearman rank
    correlation of the signed and the absolute map and by SSIM), for LRP at --eps/--gamma and for the gradient; and
    the class sensitivity (the mean Spearman correlation between the maps of different classes of an image). Writes
    sanity.json and sanity.png (similarity against the randomised depth, one line per method). --contrast applies to
    the LRP maps; the gradient stays the plain reference."""
    from lrp_brain.outputs import writable_folder
    from lrp_brain.sanity_report import format_sanity, run_sanity
    from lrp_brain.sources import open_source

    with processes(device) as device:
        writable_folder(out)
        source = open_source(checkpoint, data, split_file, split_method, split_seed, quiet=quiet)
        report = run_sanity(source, part, count, epsilon=epsilon, gamma=gamma, seed=seed, batch_size=batch_size,
                            device=device, out=out, contrast=_contrast(contrast))
        _echo(f'{report["settings"]["count"]} {part} images, randomised group by group: '
              + ', '.join(report['randomisation']['stages'][1:]))
        _echo(format_sanity(report))
        _echo(f'wrote {out}/sanity.json and {out}/sanity.png')


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


# --- import -------------------------------------------------------------------------------------------------------

@main.command('import')
@click.argument('model', type=click.Path(exists=True, dir_okay=False), metavar='MODEL.onnx')
@click.option('--out', type=click.Path(dir_okay=False), required=True, help='The checkpoint to write (MODEL.pt).')
@click.option('--classes', help='Comma-separated class names in output order. Default: class_0, class_1, ...')
@click.option('--value-range', default='0,1', show_default=True,
              help='low,high: the range the model\'s input pixels were scaled to before normalisation (0,255 for raw '
                   '8-bit input).')
@click.option('--mean', help='Comma-separated per-channel means of the normalisation (x - mean) / std, if any.')
@click.option('--std', help='Comma-separated per-channel standard deviations of the normalisation.')
@click.option('--scaling', type=click.Choice(['minmax', 'fixed']), default='minmax', show_default=True,
              help='How images are scaled to the value range: min-max per image, or fixed (value / 255 for 8-bit '
                   'images, as Keras pipelines do).')
def import_command(model, out, classes, value_range, mean, std, scaling):
    """Convert a VGG-family ONNX classifier (tf2onnx from Keras, or torch.onnx.export) into an lrp-brain checkpoint
    that every command explains: NHWC or NCHW input, Conv/Relu/MaxPool, Gemm or MatMul + Add, BatchNorm (folded, or
    kept after an activation in the head), a final Softmax dropped (LRP explains the logits). The network is checked
    against onnxruntime before anything is written."""
    from lrp_brain.model import describe_head, from_onnx, save_checkpoint

    value_range = _grid(value_range, '--value-range')
    if len(value_range) != 2:
        raise click.BadParameter(f'expected low,high, got {len(value_range)} numbers', param_hint='--value-range')
    try:
        network, meta = from_onnx(
            model, class_names=[name.strip() for name in classes.split(',')] if classes else None,
            value_range=value_range, mean=_grid(mean, '--mean') if mean else None,
            std=_grid(std, '--std') if std else None, scaling=scaling,
        )
        save_checkpoint(out, network, meta)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    imported, size = meta['imported'], meta['input_size']
    width = 'full width' if meta['width'] is None else f'width {meta["width"]}'
    click.echo(f'imported {model} ({imported["producer"] or "unknown producer"}, opset {imported["opset"]}): '
               f'{meta["arch"]} ({width}), {meta["layout"]} input {size}×{size}'
               + (' (the input Transpose is folded away: the network takes NCHW)' if meta['layout'] == 'NHWC' else ''))
    click.echo('head: average pool to {}×{}, then {}'.format(*meta['avgpool'], describe_head(meta['head'])))
    click.echo(f'classes: {", ".join(meta["class_names"])}; input value range {value_range[0]:g} to '
               f'{value_range[1]:g}' + (f', normalised by mean {mean} and std {std}' if mean else ''))
    if imported['softmax_dropped']:
        click.echo(f'dropped the final Softmax ({imported["softmax_dropped"]}): LRP explains the logits')
    click.echo(f'matches onnxruntime: largest logit difference {imported["onnxruntime_difference"]:.2g} of the '
               f'largest logit on {imported["checked_inputs"]} random inputs')
    click.echo(f'wrote {out}; check it with: lrp-brain check --checkpoint {out}')


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
    """Validate a Figshare dataset (a folder, zip or .mat file) or an image folder: read every slice once and print
    the counts per class and per patient, the image sizes, the split and every problem found. Exits with 1 when a
    file is bad, unless --skip-bad."""
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
@click.option('--study-images', type=click.IntRange(min=1), default=460, show_default=True,
              help='Images per validation and test split of the study whose cost is estimated (11x11 grid, '
                   'relevance and faithfulness, full and raced).')
def bench_command(device, batch, size, repeats, warmup, arch, width, seed, threads, no_memory, quiet, study_images):
    """Time LRP on one VGG with random weights and one batch, method against method: the plain gradient, Zennit's
    EpsilonGammaBox, Zennit's rules in the seed mapping, Captum's LRP (if installed), the project composite and
    one ε×γ sweep step per setting. Prints medians, ratios to the gradient, images/s and peak memory, and the
    estimated hours of a whole 11×11 study (relevance and faithfulness, full and raced) on the device."""
    from lrp_brain.bench import format_bench, run_bench

    try:
        result = run_bench(device=device, batch=batch, size=size, repeats=repeats, arch=arch, width=width, seed=seed,
                           warmup=warmup, memory=not no_memory, threads=threads, quiet=quiet)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(format_bench(result, study_images))
