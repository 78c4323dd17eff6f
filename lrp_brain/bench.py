"""Speed and memory of LRP on a VGG16, method against method, in one run: ``lrp-brain bench``.

Every method explains the same batch with the same model (random weights with small non-zero biases, 3 classes, in
evaluation mode) for one target per image, with a one-hot output relevance:

- ``gradient``: the plain input gradient, the 1.00× reference;
- ``zennit EpsilonGammaBox``: Zennit's own composite (z^B with ``low=0``, ``high=1``, γ on every other convolution, ε on
  the fully connected layers);
- ``zennit rules, seed mapping``: :class:`~lrp_brain.composites.VGGComposite` with Zennit's rules (``fast=False``);
- ``captum LRP``: Captum's ``LRP`` with the seed mapping as far as Captum has the rules (γ for the first convolution,
  which Captum has no z^B for; Captum's ε on pooling layers), when Captum is installed;
- ``lrp_brain VGGComposite``: the project composite with the fast rules (``fast=True``);
- ``lrp_brain sweep``: one call of :class:`lrp_brain.sweep_engine.SweepEngine` over an 11×11 ε×γ grid, reported per
  setting (its time divided by 121), so that it compares with one explanation;
- ``faithfulness MoRF+LeRF``: region perturbation (:func:`lrp_brain.faithfulness.morf_lerf`, 16 steps each, the
  project's default settings) of the sweep engine's maps of a 2×2 grid, reported per (image, setting): what a sweep
  with a faithfulness objective adds to each setting's relevance (the maps are computed once, outside the timing).

The methods are warmed up first, then timed round-robin, one call of each per round, so that drift of a shared
machine touches all of them alike; the table gives the median and the fastest call.

:func:`study_cost` turns the last two rows into the cost of a whole study on the measured device: every (image,
setting) of an 11×11 grid on a validation and a test split, scored by relevance and faithfulness, in full and as a
race (``lrp-brain sweep --race``, along the drop-out curve of each objective, :data:`RACE_SURVIVAL`, measured on
the demo).
"""
import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm
from zennit.composites import EpsilonGammaBox

from lrp_brain import faithfulness
from lrp_brain.composites import STABILIZER, VGGComposite
from lrp_brain.model import build_model, resolve_device
from lrp_brain.sweep_engine import SweepEngine
from lrp_brain.versions import library_versions

#: The ε and the γ values of the sweep row's grid (11 each, 121 settings).
SWEEP_VALUES = tuple(round(0.1 * step, 1) for step in range(11))

#: The ε and the γ values whose maps the faithfulness row perturbs (4 maps per image, as a sweep hands them over).
FAITHFULNESS_VALUES = (0.1, 1.)

#: Standard deviation of the random biases the benchmark model gets (torchvision initialises them to zero).
BIAS_STD = 0.01

MEMORY_NOTE_CPU = (
    'peak memory: tensor memory allocated through torch during one call beyond what was allocated before it, summed '
    'from the allocation events of torch.profiler (the CPU analogue of torch.cuda.max_memory_allocated); model '
    'weights and the input are not counted, nor scratch memory a library allocates itself (oneDNN).'
)
MEMORY_NOTE_CUDA = (
    'peak memory: torch.cuda.max_memory_allocated during one call minus the memory allocated before it (model '
    'weights and the input are not counted).'
)


#: Each objective's race drop-out curve: ``(validation images seen, fraction of the settings still in the race)``
#: after each round, measured by ``lrp-brain sweep --race --objective …`` on the demo defaults (demo model, 300
#: phantoms: 50 validation images in 7 rounds of 8, the 5×5 grid, both criteria scored, confidence 0.95) on
#: 2026-12-02; see the README. The demo's faithfulness gaps hardly differ between settings, so those races keep nearly
#: every setting and save little more than the test split.
RACE_SURVIVAL = {
    'iou': ((8, 1.), (16, 0.44), (24, 0.40), (32, 0.20), (40, 0.20), (48, 0.20), (50, 0.20)),
    'faithfulness': ((8, 1.), (16, 1.), (24, 1.), (32, 1.), (40, 1.), (48, 1.), (50, 0.92)),
    'pareto': ((8, 1.), (16, 1.), (24, 1.), (32, 1.), (40, 1.), (48, 1.), (50, 0.92)),
}

#: The study :func:`study_cost` prices by default: the seed's 11×11 grid on a Figshare-sized split.
STUDY_GRID, STUDY_IMAGES = 121, 460


@dataclass(frozen=True)
class StudyCost:
    """What a whole sweep would cost on the benchmark's device (see :func:`study_cost`).

    Attributes
    ----------
    relevance_seconds, faithfulness_seconds: float
        Measured seconds per (image, setting): the sweep engine's relevance and MoRF+LeRF region perturbation.
    settings, images, test_images: int
        The grid size and the validation and test split sizes priced.
    full_hours, race_hours: float
        The full sweep (every setting on both splits) and the race (the settings in the race on validation, round
        by round along a drop-out curve of :data:`RACE_SURVIVAL`, and the chosen setting alone on test).
    race_fraction: float
        ``race_hours / full_hours``.
    """
    relevance_seconds: float
    faithfulness_seconds: float
    settings: int
    images: int
    test_images: int
    full_hours: float
    race_hours: float
    race_fraction: float


def study_cost(result, survival, settings=STUDY_GRID, images=STUDY_IMAGES, test_images=None):
    """Price a whole sweep from a :class:`BenchResult`'s ``lrp_brain sweep`` and ``faithfulness MoRF+LeRF`` rows.

    One (image, setting) costs ``c = r + f``, its relevance and its faithfulness (each row's seconds over the batch).
    The full sweep costs ``(images + test_images) · settings · c``. The race costs ``settings · c · Σ_k (n_k −
    n_{k−1}) · a_{k−1}`` on validation, for the rounds ``(n_k, a_k)`` of the drop-out curve ``survival`` (one of
    :data:`RACE_SURVIVAL`'s; ``a_0 = 1``; the images beyond its last round at its last fraction), plus
    ``test_images · c`` for the chosen setting on test. The curve was measured by images seen, not by share of the
    split: on a larger split the race has more rounds (a stricter correction) but every round's bound is at least as
    tight, so this is an estimate, not a bound.
    """
    test_images = images if test_images is None else test_images
    rows = {row.method: row for row in result.rows}
    batch = result.settings['batch']
    relevance, perturbation = (rows[name].seconds / batch for name in ('lrp_brain sweep', 'faithfulness MoRF+LeRF'))
    each = relevance + perturbation
    seen, alive, raced = 0, 1., 0.
    for count, fraction in survival:
        count = min(count, images)
        raced, seen, alive = raced + (count - seen) * alive, count, fraction
    raced += (images - seen) * alive
    full = (images + test_images) * settings * each
    race = raced * settings * each + test_images * each
    return StudyCost(relevance, perturbation, settings, images, test_images, full / 3600, race / 3600, race / full)


def format_study_cost(costs, device):
    """The lines ``lrp-brain bench`` prints for ``{objective: StudyCost}`` (one study raced by each objective's
    curve) on ``device`` (in words)."""
    cost = next(iter(costs.values()))  # the same study: only the race differs
    return '\n'.join([
        f'study estimate on {device}: {cost.settings} settings x ({cost.images} validation + {cost.test_images} test '
        f'images), {cost.relevance_seconds * 1e3:.2f} ms relevance + {cost.faithfulness_seconds * 1e3:.2f} ms '
        f'faithfulness per (image, setting)',
        f'  full sweep: {cost.full_hours:.2f} h',
        *(f'  raced by {objective} (its demo drop-out curve, chosen setting alone on test): {raced.race_hours:.2f} h '
          f'({100 * raced.race_fraction:.0f} %)' for objective, raced in costs.items()),
    ])


class BenchError(ValueError):
    """A benchmark setting that cannot run: the message names the option and value."""


@dataclass(frozen=True)
class BenchRow:
    """One method of the benchmark.

    Attributes
    ----------
    method: str
        The method's name.
    seconds: float
        Median seconds of one call for the whole batch (the sweep: of one setting, the call divided by 121).
    best_seconds: float
        The fastest call, likewise.
    ratio: float
        ``seconds`` over the gradient's ``seconds``.
    images_per_second: float
        Batch size over ``seconds`` (the sweep: image-settings per second).
    peak_memory: int or None
        Peak bytes of one call (see :data:`MEMORY_NOTE_CPU`), ``None`` when not measured.
    note: str
        What the row measures, if it needs saying.
    """
    method: str
    seconds: float
    best_seconds: float
    ratio: float
    images_per_second: float
    peak_memory: Optional[int] = None
    note: str = ''


@dataclass(frozen=True)
class BenchResult:
    """The benchmark's table and what it was measured on.

    Attributes
    ----------
    rows: tuple of BenchRow
        One per method, the gradient first.
    device: str
        The device in words (CPU model and threads, or the GPU's name).
    settings: dict
        ``arch``, ``width``, ``batch``, ``size``, ``repeats``, ``warmup``, ``seed``, ``device``.
    versions: dict
        Library versions (:func:`lrp_brain.versions.library_versions`, plus captum when installed).
    notes: tuple of str
        Methods left out and why, and how memory was measured.
    """
    rows: tuple
    device: str
    settings: dict
    versions: dict
    notes: tuple = field(default_factory=tuple)


def bench_model(arch='vgg16', width=None, seed=0):
    """Build the benchmark's model: random weights (seeded), biases ~ N(0, :data:`BIAS_STD`²), 3 classes, eval mode.

    Parameters
    ----------
    arch: str
        A VGG architecture :func:`lrp_brain.model.build_model` knows, e.g. ``'vgg16'``.
    width: int, optional
        ``None`` for torchvision's full network, else the width-reduced topology (for quick runs).
    seed: int
    """
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=3, width=width)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, 'bias', None) is not None:
                module.bias.normal_(0., BIAS_STD)
    return model.eval().requires_grad_(False)


def _one_hot(output, targets):
    return torch.zeros_like(output).scatter_(1, targets[:, None], 1.)


def _composite_relevance(model, composite, images, targets):
    with composite.context(model) as hooked:
        input = images.detach().requires_grad_()
        output = hooked(input)
        relevance, = torch.autograd.grad(output, input, _one_hot(output, targets))
    return relevance


def _gradient(model, images, targets):
    input = images.detach().requires_grad_()
    output = model(input)
    gradient, = torch.autograd.grad(output, input, _one_hot(output, targets))
    return gradient


def _captum_relevance(model, composite, images, targets, captum_lrp, captum_rules):
    """Captum's LRP with the seed mapping's rules (set again per call: Captum removes them afterwards)."""
    modules = dict(model.named_modules())
    for row in composite.layer_rules(model):
        rule = captum_rules.get(row.group)
        if rule is not None:
            modules[row.name].rule = rule()
    return captum_lrp(model).attribute(images.detach().requires_grad_(), target=targets)


def _methods(model, low, high, notes):
    """Return ``[(name, call(images, targets), settings per call, note)]`` for the methods available here."""
    fast, stock = VGGComposite(low=low, high=high, fast=True), VGGComposite(low=low, high=high, fast=False)
    box = EpsilonGammaBox(low=low, high=high)
    methods = [
        ('gradient', lambda images, targets: _gradient(model, images, targets), 1, ''),
        ('zennit EpsilonGammaBox', lambda images, targets: _composite_relevance(model, box, images, targets), 1,
         'stock zennit composite'),
        ('zennit rules, seed mapping', lambda images, targets: _composite_relevance(model, stock, images, targets), 1,
         'VGGComposite(fast=False)'),
    ]
    try:
        from captum.attr import LRP
        from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule
    except ImportError:
        notes.append('captum LRP: left out, captum is not installed (pip install lrp-brain[bench])')
    else:
        captum_rules = {
            'first_conv': lambda: GammaRule(gamma=fast.gamma),
            'gamma_conv': lambda: GammaRule(gamma=fast.gamma),
            'epsilon_conv': lambda: EpsilonRule(epsilon=fast.epsilon),
            'epsilon_linear': lambda: EpsilonRule(epsilon=fast.epsilon),
            'linear': lambda: EpsilonRule(epsilon=STABILIZER),
        }
        methods.append((
            'captum LRP',
            lambda images, targets: _captum_relevance(model, fast, images, targets, LRP, captum_rules), 1,
            'no z^B in captum: γ on conv1_1',
        ))
    methods.append(('lrp_brain VGGComposite', lambda images, targets: _composite_relevance(model, fast, images,
                                                                                            targets), 1,
                    'VGGComposite(fast=True)'))
    engine = SweepEngine(model, SWEEP_VALUES, SWEEP_VALUES, low, high)
    methods.append(('lrp_brain sweep', engine.relevance, len(SWEEP_VALUES) ** 2,
                    f'{len(SWEEP_VALUES)}x{len(SWEEP_VALUES)} grid: time per setting, memory per call'))
    maps = _FaithfulnessMaps(SweepEngine(model, FAITHFULNESS_VALUES, FAITHFULNESS_VALUES, low, high))
    steps = faithfulness.DEFAULTS['steps']
    methods.append((
        'faithfulness MoRF+LeRF',
        lambda images, targets: faithfulness.morf_lerf(model, images, maps(images, targets), targets,
                                                       **faithfulness.DEFAULTS),
        len(FAITHFULNESS_VALUES) ** 2,
        f'{steps} steps each, {len(FAITHFULNESS_VALUES) ** 2} sweep maps per image: time per (image, setting), '
        f'{faithfulness.forwards_per_map(steps, len(FAITHFULNESS_VALUES) ** 2):.2f} forwards each',
    ))
    return methods


class _FaithfulnessMaps:
    """The sweep engine's maps of the bench's images, computed once (the faithfulness row times the perturbation
    alone): ``(S, N, C, H, W)``."""
    def __init__(self, engine):
        self.engine, self.inputs, self.maps = engine, (None, None), None

    def __call__(self, images, targets):
        if self.inputs[0] is not images or self.inputs[1] is not targets:
            self.inputs, self.maps = (images, targets), self.engine.relevance(images, targets).flatten(0, 1)
        return self.maps


def _synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(call, images, targets, device):
    _synchronize(device)
    start = time.perf_counter()
    call(images, targets)
    _synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines) for the duration."""
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(call, images, targets, device):
    """Return the peak bytes one ``call(images, targets)`` allocates beyond what is allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the allocation and release events that
    ``torch.profiler`` records (every tensor allocated through torch's CPU allocator), at its highest.
    """
    if device.type == 'cuda':
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call(images, targets)
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call(images, targets)
    events = sorted(
        (event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
        if event.name() == '[memory]' and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = highest = 0
    for _, change in events:
        current += change
        highest = max(highest, current)
    return highest


def device_name(device):
    """Return the device in words: the GPU's name, or the CPU model (from /proc/cpuinfo) and torch's threads."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as cpuinfo:
            model = next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), model)
    return f'{model}, {torch.get_num_threads()} threads'


def _versions():
    versions = library_versions()
    with contextlib.suppress(ImportError):
        import captum
        versions['captum'] = captum.__version__
    return versions


def run_bench(device='cpu', batch=1, size=224, repeats=5, arch='vgg16', width=None, seed=0, warmup=1, memory=True,
              threads=None, quiet=False):
    """Time (and measure the memory of) every method on one model and one batch; see the module's docstring.

    Parameters
    ----------
    device: str
        ``'cpu'``, ``'cuda'``, ``'cuda:N'`` or ``'auto'``.
    batch, size: int
        Images per call, and their height and width.
    repeats: int
        Timed rounds (one call of every method each).
    arch, width:
        The model, see :func:`bench_model`.
    seed: int
        Seed of the model's weights, the images and the targets.
    warmup: int
        Untimed calls of every method first.
    memory: bool
        Also measure each method's peak memory (one more call each).
    threads: int, optional
        CPU threads of torch for the run (restored afterwards); default: as set.
    quiet: bool
        No progress bar.

    Returns
    -------
    BenchResult

    Raises
    ------
    BenchError
        For a batch, size, repeats, warmup or threads out of range, or a device that does not exist here.
    """
    for name, value, lowest in (('batch', batch, 1), ('size', size, 32), ('repeats', repeats, 1),
                                ('warmup', warmup, 0), ('threads', 1 if threads is None else threads, 1)):
        if isinstance(value, bool) or int(value) != value or value < lowest:
            raise BenchError(f'{name} must be an integer >= {lowest}, got {value!r}')
    try:
        device = resolve_device(device)
    except ValueError as error:
        raise BenchError(str(error)) from error
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(previous_threads if threads is None else int(threads))
    try:
        return _run(device, batch, size, repeats, arch, width, seed, warmup, memory, quiet)
    finally:
        torch.set_num_threads(previous_threads)


def _run(device, batch, size, repeats, arch, width, seed, warmup, memory, quiet):
    model = bench_model(arch, width, seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator).to(device)
    targets = torch.randint(0, 3, (batch,), generator=generator).to(device)
    notes = []
    methods = _methods(model, 0., 1., notes)

    for _, call, _, _ in methods:
        for _ in range(warmup):
            call(images, targets)
    times = {name: [] for name, _, _, _ in methods}
    for _ in tqdm(range(repeats), desc='bench rounds', disable=quiet):
        for name, call, settings, _ in methods:
            times[name].append(_timed(call, images, targets, device) / settings)

    reference = statistics.median(times['gradient'])
    rows = []
    for name, call, settings, note in methods:
        median = statistics.median(times[name])
        peak = peak_memory(call, images, targets, device) if memory else None
        rows.append(BenchRow(
            method=name, seconds=median, best_seconds=min(times[name]), ratio=median / reference,
            images_per_second=batch / median, peak_memory=peak, note=note,
        ))
    if memory:
        notes.append(MEMORY_NOTE_CUDA if device.type == 'cuda' else MEMORY_NOTE_CPU)
    settings = dict(arch=arch, width=width, batch=batch, size=size, repeats=repeats, warmup=warmup, seed=seed,
                    device=str(device), threads=torch.get_num_threads())
    return BenchResult(tuple(rows), device_name(device), settings, _versions(), tuple(notes))


def format_bench(result, study_images=STUDY_IMAGES):
    """Format a :class:`BenchResult` as the text table ``lrp-brain bench`` prints, ending with the estimated cost of
    a study with ``study_images`` validation and test images (:func:`study_cost`)."""
    settings = result.settings
    model = settings['arch'] + ('' if settings['width'] is None else f' (width {settings["width"]})')
    lines = [
        f'{model}, 3 classes, random weights; batch {settings["batch"]}, {settings["size"]}x{settings["size"]}; '
        f'{settings["repeats"]} rounds after {settings["warmup"]} warm-up (median, best); seed {settings["seed"]}',
        f'device: {settings["device"]} ({result.device})',
        '',
        f'{"method":<28} {"median s":>9} {"best s":>9} {"x grad":>7} {"images/s":>9} {"peak MiB":>9}  note',
    ]
    for row in result.rows:
        peak = '-' if row.peak_memory is None else f'{row.peak_memory / 2 ** 20:.1f}'
        lines.append(
            f'{row.method:<28} {row.seconds:>9.4f} {row.best_seconds:>9.4f} {row.ratio:>7.2f} '
            f'{row.images_per_second:>9.2f} {peak:>9}  {row.note}'
        )
    lines.append('')
    lines.extend(result.notes)
    lines.append('versions: ' + ', '.join(f'{name} {version}' for name, version in result.versions.items()))
    costs = {objective: study_cost(result, survival, images=study_images) for objective, survival in
             RACE_SURVIVAL.items()}
    lines.append(format_study_cost(costs, result.device))
    return '\n'.join(lines)
