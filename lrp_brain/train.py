"""Training a VGG classifier of the slices: the seed study's setup, made resumable, deterministic and honest.

The setup is the study's: Adam on the cross-entropy, random left-right flips of the training images (the project's
:class:`~lrp_brain.data.Transform` with ``flips=True``), per-image min-max to [0, 1]. What it does better: the split
is patient-wise (saved beside the model and recorded in it), the model kept is the one best on the validation split,
and accuracy is reported once, on the test split, with a confusion matrix.

Outputs of ``train(data, 'model.pt', ...)``:

=========================  ==================================================================================
``model.pt``               the best model on validation (see :func:`lrp_brain.model.save_checkpoint`)
``model.pt.last``          the resume state: last epoch's weights, optimiser state, history, the run's arguments
``model.split.json``       the split (unless ``split_file`` names another file)
``model.confusion.png``    the test split's confusion matrix
``model.test.json``        test accuracy, per-class accuracy and the confusion matrix
=========================  ==================================================================================

Every file is written atomically. Randomness depends on the seed and the epoch only: the weights are initialised
under ``seed``, and epoch ``e`` shuffles, flips and drops out from seeds derived from ``(seed, e)`` (the flip of an
image from ``(seed, e, index)``, whichever worker reads it). An interrupted run therefore resumes from its last
finished epoch without storing random states, and ends with the weights an uninterrupted run would have.
"""
import io
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from lrp_brain import distributed
from lrp_brain.data import CLASS_NAMES, DataError, Transform, load_split, open_dataset, read_slice
from lrp_brain.figures import confusion_matrix_figure
from lrp_brain.model import (
    CheckpointError, _non_finite_problems, build_model, init_imagenet, load_checkpoint, resolve_device, save_checkpoint,
)
from lrp_brain.outputs import ResumeError, atomic_write_bytes, atomic_write_json, check_output_file, exclusive
from lrp_brain.phantom import phantom_dataset
from lrp_brain.versions import library_versions

#: The number of phantoms generated when no data is given.
DEFAULT_PHANTOMS = 600

_RESUME_FORMAT = 'lrp-brain training state'


class TrainingError(ValueError):
    """Training cannot start (a bad option) or cannot go on (the loss or the weights are no longer finite)."""


def output_paths(out):
    """The files a training run writes beside the model ``out``.

    Returns
    -------
    dict
        ``'checkpoint'`` (``out``), ``'resume'`` (``out + '.last'``), and, with ``out``'s extension replaced,
        ``'split'`` (``.split.json``), ``'confusion'`` (``.confusion.png``) and ``'test'`` (``.test.json``).
    """
    out = os.path.abspath(os.fspath(out))
    stem = os.path.splitext(out)[0]
    return {'checkpoint': out, 'resume': out + '.last', 'split': stem + '.split.json',
            'confusion': stem + '.confusion.png', 'test': stem + '.test.json'}


def derived_seed(*numbers):
    """A 63-bit seed derived from a tuple of non-negative integers, e.g. ``(seed, epoch)``; distinct tuples give
    statistically independent seeds (numpy's :class:`~numpy.random.SeedSequence`)."""
    return int(np.random.SeedSequence([int(number) for number in numbers]).generate_state(2, np.uint64)[0] >> 1)


class LabelledSlices(torch.utils.data.Dataset):
    """Slices as ``(image, label)`` pairs for training and accuracy, with flips reproducible per epoch.

    Parameters
    ----------
    refs: list of str
        Slice references (see :func:`lrp_brain.data.find_slices`).
    transform: lrp_brain.data.Transform
        The preprocessing; with ``flips`` the flip of item ``index`` in epoch ``epoch`` is drawn from a generator
        seeded by ``derived_seed(seed, epoch, index)``, so it does not depend on the order or the process in which
        items are read.
    seed: int
        The run's seed.
    read: callable
        Reads one reference (:func:`lrp_brain.data.read_slice`, or a dataset's ``read``, see
        :func:`lrp_brain.data.open_dataset`).

    Attributes
    ----------
    epoch: int
        The epoch the next flips belong to; set it (:meth:`set_epoch`) before iterating.
    """
    def __init__(self, refs, transform, seed=0, read=read_slice):
        self.refs = list(refs)
        self.transform = transform
        self.seed = int(seed)
        self.read = read
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, index):
        item = self.read(self.refs[index])
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        image, _ = self.transform(item.image, generator=generator, full_scale=item.full_scale)
        return image, item.label


@dataclass
class Evaluation:
    """The predictions of a classifier on a set of slices, as a confusion matrix.

    Attributes
    ----------
    matrix: numpy.ndarray
        ``(K, K)`` int64 counts; row = true class, column = predicted class.
    class_names: tuple of str
        The ``K`` class names.
    """
    matrix: np.ndarray
    class_names: tuple

    @property
    def count(self):
        return int(self.matrix.sum())

    @property
    def accuracy(self):
        """The fraction of slices classified correctly (``nan`` for none)."""
        return float(np.trace(self.matrix) / self.count) if self.count else float('nan')

    @property
    def per_class(self):
        """``{class name: accuracy}``, the recall of each class (``None`` for a class without slices)."""
        totals = self.matrix.sum(axis=1)
        return {name: float(self.matrix[index, index] / totals[index]) if totals[index] else None
                for index, name in enumerate(self.class_names)}

    def to_dict(self):
        return {'count': self.count, 'accuracy': self.accuracy, 'per_class': self.per_class,
                'class_names': list(self.class_names), 'matrix': self.matrix.tolist()}

    def format(self):
        """The accuracy, overall and per class, as lines of text."""
        totals = self.matrix.sum(axis=1)
        lines = [f'accuracy {self.accuracy:.4f} ({np.trace(self.matrix)}/{self.count})']
        for index, (name, accuracy) in enumerate(self.per_class.items()):
            shown = 'n/a' if accuracy is None else f'{accuracy:.4f}'
            lines.append(f'  {name:<12}{shown:>8}  ({self.matrix[index, index]}/{totals[index]})')
        return '\n'.join(lines)


def confusion_matrix(labels, predictions, num_classes):
    """Count ``(true, predicted)`` pairs: a ``(num_classes, num_classes)`` int64 matrix, rows the true classes."""
    labels, predictions = (np.asarray(values, dtype=np.int64).reshape(-1) for values in (labels, predictions))
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, -1)


@torch.no_grad()
def evaluate(model, refs, transform, class_names=CLASS_NAMES, device='cpu', batch_size=32, num_workers=0,
             progress=False, description='evaluating', read=read_slice):
    """Classify slices and count the outcomes.

    Parameters
    ----------
    model: torch.nn.Module
        The classifier (put in eval mode here, on ``device``).
    refs: list of str
        Slice references.
    transform: lrp_brain.data.Transform
        The model's preprocessing (without flips).
    class_names: tuple of str
        The model's classes.
    device: str or torch.device
        Where to run the model.
    batch_size, num_workers: int
        Loading.
    progress: bool
        Show a progress bar.
    read: callable
        Reads one reference (see :class:`LabelledSlices`).

    Returns
    -------
    Evaluation
    """
    model.eval().to(device)
    # under torchrun each process classifies every world_size-th slice; the counts are summed over the processes
    shard = list(refs)[distributed.rank()::distributed.world_size()]
    loader = torch.utils.data.DataLoader(LabelledSlices(shard, transform, read=read), batch_size=batch_size,
                                         num_workers=num_workers)
    labels, predictions = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for images, batch_labels in tqdm(loader, desc=description, unit='batch', leave=False,
                                     disable=not (progress and distributed.is_main())):
        predictions.append(model(images.to(device)).argmax(1).cpu())
        labels.append(batch_labels)
    matrix = confusion_matrix(torch.cat(labels), torch.cat(predictions), len(class_names))
    return Evaluation(distributed.all_reduce_sum(torch.from_numpy(matrix)).numpy(), tuple(class_names))


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    paths: dict
        The files written (see :func:`output_paths`); ``'split'`` is the split file used.
    epochs: int
        The finished epochs, resumed ones included.
    resumed_from: int
        The epochs already finished when this call started (0 for a fresh run).
    best_epoch: int
        The (1-based) epoch of the model kept.
    val_accuracy: float
        Its validation accuracy.
    history: list of dict
        Per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``val_accuracy``.
    test: Evaluation
        The kept model on the test split.
    """
    paths: dict
    epochs: int
    resumed_from: int
    best_epoch: int
    val_accuracy: float
    history: list
    test: Evaluation


def _versions():
    # plain strings: torch.__version__ is a str subclass that weights_only loading refuses to unpickle
    return {name: str(version) for name, version in library_versions().items()}


def _save_torch(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _resume_state(paths, arguments, epochs):
    """Read the resume state of an earlier run of the same command, or ``None`` for a fresh start.

    A different command (any argument but the epochs, device, loading and progress), more finished epochs than
    asked for, or a model file that another command wrote is refused with :class:`ResumeError`. A model file of this
    command without resume state (a run stopped between writing the two after its first epoch) starts afresh: the
    run is deterministic, so it rewrites the same model.
    """
    resume, checkpoint = paths['resume'], paths['checkpoint']
    if not os.path.exists(resume):
        if os.path.exists(checkpoint):
            try:
                trained_with = load_checkpoint(checkpoint)[1].get('training', {})
            except CheckpointError:
                trained_with = {}
            if any(trained_with.get(name) != value for name, value in arguments.items()):
                raise ResumeError(f'{checkpoint} exists, was not written by this command and has no resume state '
                                  f'{resume}: delete it or choose another output, training would overwrite it')
        return None
    try:
        state = torch.load(resume, map_location='cpu', weights_only=True)
    except Exception as error:
        raise ResumeError(f'{resume}: cannot read the resume state ({error}); delete it to start over') from error
    if not isinstance(state, dict) or state.get('format') != _RESUME_FORMAT:
        raise ResumeError(f'{resume}: not an lrp-brain training state; delete it to start over')
    stored = state['arguments']
    changed = sorted(name for name in set(stored) | set(arguments) if stored.get(name) != arguments.get(name))
    if changed:
        differences = ', '.join(f'{name}={stored.get(name)!r} there, {arguments.get(name)!r} now' for name in changed)
        raise ResumeError(f'{resume} belongs to a run with other arguments ({differences}); rerun with the same '
                          f'arguments to resume, or delete {resume} and {checkpoint} to start over')
    if state['epoch'] > epochs:
        raise ResumeError(f'{resume} has {state["epoch"]} finished epochs, more than the {epochs} asked for; '
                          f'ask for at least {state["epoch"]} epochs')
    return state


def train(data=None, out='model.pt', arch='vgg16', width=None, epochs=30, batch_size=32, lr=1e-4, size=224,
          split_file=None, seed=0, device='auto', init_weights=None, num_workers=0, progress=True,
          phantoms=DEFAULT_PHANTOMS):
    """Train a VGG classifier of the dataset's classes, keep the best on validation, report it on test.

    Rerunning the same call after an interruption resumes from the last finished epoch; asking for more epochs
    than a finished run had continues it.

    Parameters
    ----------
    data: str or os.PathLike, optional
        The dataset: Figshare slices or an image folder (see :func:`lrp_brain.data.open_dataset`); the model's classes
        are the dataset's. ``None``: ``phantoms`` generated phantoms (see :func:`lrp_brain.phantom.phantom_dataset`,
        seeded with ``seed``).
    out: str or os.PathLike
        The model file; the other outputs are written beside it (see :func:`output_paths`).
    arch: str
        The architecture (see :func:`lrp_brain.model.build_model`).
    width: int, optional
        The channels of the first block (64 for the full VGG16; ``None``: the architecture's own).
    epochs: int
        The number of epochs to have finished at the end.
    batch_size: int
        Training and evaluation batch size.
    lr: float
        Adam's learning rate.
    size: int
        The input side in pixels.
    split_file: str or os.PathLike, optional
        A split JSON to use (made and saved there if it does not exist); default ``<out stem>.split.json``.
    seed: int
        Seeds the patient-wise split, the weights and every random choice of training.
    device: str
        ``'auto'``, ``'cpu'`` or ``'cuda'`` (see :func:`lrp_brain.model.resolve_device`).
    init_weights: str or os.PathLike, optional
        torchvision's ImageNet VGG16 weights file (``vgg16-397923af.pth``) to start from (see
        :func:`lrp_brain.model.init_imagenet`).
    num_workers: int
        Data loading processes (results do not depend on it).
    progress: bool
        Show progress bars.
    phantoms: int
        The number of phantoms generated when ``data`` is ``None``.

    Returns
    -------
    TrainResult

    Raises
    ------
    ResumeError
        Where the outputs belong to a run with other arguments (see :func:`_resume_state`).
    DataError
        For bad data or a split with an empty part.
    TrainingError
        For a learning rate that is not a finite number > 0, before any work; and when the loss of a batch or the
        weights after an epoch are NaN or infinite: training stops there, naming the learning rate, the epoch and
        the batch, and the files of the last finished epoch are left as they were (nothing is written for the
        diverged one).
    OutputError
        Where the outputs cannot be written (checked before any work), or another run is writing them.
    """
    if int(epochs) < 1:
        raise ValueError(f'epochs must be at least 1, got {epochs!r}')
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise TrainingError(f'the learning rate (--lr) must be a finite number > 0, got {lr!r}')
    device = resolve_device(device)
    progress = progress and distributed.is_main()
    with distributed.main_first():  # under torchrun, rank 0 writes the phantoms, the rest read them
        if data is None:
            data = phantom_dataset(phantoms, seed, quiet=not progress)
    paths = output_paths(out)
    if split_file is not None:
        paths['split'] = os.path.abspath(os.fspath(split_file))
    arguments = {
        'data': os.path.abspath(os.fspath(data)), 'arch': arch, 'width': width, 'batch_size': int(batch_size),
        'lr': float(lr), 'size': int(size), 'split_file': paths['split'], 'seed': int(seed),
        'init_weights': None if init_weights is None else os.path.abspath(os.fspath(init_weights)),
    }
    for path in paths.values():
        check_output_file(path)  # a rename over a device or pipe named as output would replace it
    # the outputs' folder is checked writable and held for this run (rank 0 writes): a second run on it is refused
    with distributed.held_by_main(lambda: exclusive(paths['checkpoint'] + '.lock', paths['checkpoint'])):
        state = _resume_state(paths, arguments, int(epochs))
        with distributed.main_first():  # rank 0 writes the split file, the rest read it
            dataset = open_dataset(data)
            split = load_split(dataset, paths['split'], method='patient', seed=seed, quiet=not progress)
        for name, refs in split.parts().items():
            if not refs:
                raise DataError(f'the {name} part of the split is empty', paths['split'], 'split file')
        train_transform = Transform(size=size, flips=True)
        eval_transform = Transform(size=size)
        class_names = tuple(dataset.class_names)

        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            torch.manual_seed(seed)
            model = build_model(arch, num_classes=len(class_names), width=width)
            if init_weights is not None:
                init_imagenet(model, init_weights)
        model.to(device)
        # DistributedDataParallel averages the gradients of the processes after every backward pass
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None) if distributed.active() else model
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        if state is None:
            state = {'format': _RESUME_FORMAT, 'arguments': arguments, 'epoch': 0, 'best_epoch': 0,
                     'best_val_accuracy': -1., 'history': []}
        else:
            model.load_state_dict(state['model'])
            optimizer.load_state_dict(state['optimizer'])
        resumed_from = state['epoch']

        meta = {
            'arch': arch, 'width': width, 'class_names': list(class_names), 'input_size': int(size),
            'transform': eval_transform.to_dict(), 'split_file': paths['split'], 'seed': int(seed),
            'training': {**arguments, 'optimizer': 'Adam', 'loss': 'cross-entropy', 'flips': 'left-right'},
        }
        train_set = LabelledSlices(split.train, train_transform, seed, dataset.read)
        epoch_bar = tqdm(range(resumed_from + 1, int(epochs) + 1), desc='epochs', unit='epoch', disable=not progress,
                         initial=resumed_from, total=int(epochs))
        for epoch in epoch_bar:
            with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
                # dropout masks: from (seed, epoch), and the rank when there are several processes
                torch.manual_seed(derived_seed(seed, epoch, *([distributed.rank()] if distributed.active() else [])))
                try:
                    loss, accuracy = _train_epoch(trained, optimizer, train_set, epoch, seed, batch_size, device,
                                                  num_workers, progress)
                except TrainingError as error:
                    raise TrainingError(f'{error}. {_kept(paths, state)}') from None
            broken = _non_finite_problems(model.state_dict())
            if broken:
                raise TrainingError(f'training diverged: after epoch {epoch} with the learning rate {lr:g} '
                                    f'{broken}; try a smaller --lr. {_kept(paths, state)}')
            validation = evaluate(model, split.val, eval_transform, class_names, device, batch_size, num_workers,
                                  progress, 'validating', dataset.read)
            row = {'epoch': epoch, 'train_loss': loss, 'train_accuracy': accuracy, 'val_accuracy': validation.accuracy}
            state['history'].append(row)
            improved = validation.accuracy > state['best_val_accuracy']
            if improved:
                state['best_epoch'], state['best_val_accuracy'] = epoch, validation.accuracy
            state.update(epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict())
            distributed.on_main(lambda: _save_epoch(paths, model, state, meta if improved else None))
            epoch_bar.set_postfix(loss=f'{loss:.3f}', val=f'{validation.accuracy:.3f}',
                                  best=f'{state["best_val_accuracy"]:.3f}')

        best_model, best_meta = load_checkpoint(paths['checkpoint'])
        test = evaluate(best_model, split.test, Transform.from_dict(best_meta['transform']), class_names, device,
                        batch_size, num_workers, progress, 'testing', dataset.read)
        distributed.on_main(lambda: _save_test(paths, test, state, seed))
        return TrainResult(paths, state['epoch'], resumed_from, state['best_epoch'], state['best_val_accuracy'],
                           list(state['history']), test)


def _kept(paths, state):
    """What a stopped run leaves behind, in words."""
    if not state['epoch']:
        return 'No model and no resume state were saved: no epoch finished'
    return (f'Kept as they were: the model of epoch {state["best_epoch"]} in {paths["checkpoint"]} and the state after '
            f'epoch {state["epoch"]} in {paths["resume"]}; delete both to start over with another learning rate')


def _save_epoch(paths, model, state, best_meta):
    """Write the resume state of a finished epoch and, with ``best_meta``, the model as the best so far."""
    if best_meta is not None:
        save_checkpoint(paths['checkpoint'], model, {**best_meta, 'epoch': state['best_epoch'],
                                                     'val_accuracy': state['best_val_accuracy'],
                                                     'versions': _versions()})
    _save_torch(state, paths['resume'])


def _save_test(paths, test, state, seed):
    """Write the test split's confusion matrix figure and results."""
    confusion_matrix_figure(paths['confusion'], test.matrix, test.class_names,
                            title=f'{os.path.basename(paths["checkpoint"])} on the test split')
    atomic_write_json(paths['test'], {
        'checkpoint': paths['checkpoint'], 'split_file': paths['split'], 'best_epoch': state['best_epoch'],
        'val_accuracy': state['best_val_accuracy'], 'test': test.to_dict(), 'seed': int(seed),
        'versions': _versions(),
    })


class EpochBatches(torch.utils.data.Sampler):
    """This process's part of each batch of a shuffled epoch.

    The epoch's order is a permutation of ``range(count)`` drawn from ``generator`` when iteration starts (as
    torch's own shuffling draws it), cut into batches of ``batch_size``; each batch is dealt out over the
    processes, every ``world_size``-th image to one. With several processes, a last batch too small to give every
    process an image is dropped (a process without images would leave the others waiting for its gradients).
    """
    def __init__(self, count, batch_size, generator):
        self.count, self.batch_size, self.generator = int(count), int(batch_size), generator
        self.processes, self.position = distributed.world_size(), distributed.rank()

    def batch_lengths(self):
        """The whole batches' lengths (over all processes), in order."""
        lengths = [min(self.batch_size, self.count - start) for start in range(0, self.count, self.batch_size)]
        return [length for length in lengths if length >= self.processes]

    def __len__(self):
        return len(self.batch_lengths())

    def __iter__(self):
        order = torch.randperm(self.count, generator=self.generator).tolist()
        for start, _ in zip(range(0, self.count, self.batch_size), self.batch_lengths()):
            yield order[start:start + self.batch_size][self.position::self.processes]


def _train_epoch(model, optimizer, dataset, epoch, seed, batch_size, device, num_workers, progress):
    """One pass over the training slices in the order of epoch ``epoch``; return mean loss and accuracy."""
    model.train()
    dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch))  # the order and the workers' seeds
    sampler = EpochBatches(len(dataset), batch_size, generator)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         generator=generator)
    lengths = sampler.batch_lengths()
    total_loss, correct, count = 0., 0, 0
    for step, (images, labels) in enumerate(tqdm(loader, desc=f'epoch {epoch}', unit='batch', leave=False,
                                                 disable=not progress)):
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = functional.cross_entropy(logits, labels)
        value = loss.item()
        # every process stops at the same batch (a process that stopped alone would leave the others waiting)
        if distributed.all_reduce_sum(torch.tensor([0. if math.isfinite(value) else 1.])).item():
            raise TrainingError(f'training diverged: the loss of epoch {epoch}, batch {step + 1} of {len(lengths)} is '
                                f'not finite ({value}) with the learning rate '
                                f'{optimizer.param_groups[0]["lr"]:g}; try a smaller --lr')
        # DistributedDataParallel averages the processes' gradients (divides their sum by W); weighting each
        # process's mean loss by W times its share of the batch makes that the gradient of the whole batch's mean
        (loss * (len(labels) * distributed.world_size() / lengths[step])).backward()
        optimizer.step()
        total_loss += value * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    total_loss, correct, count = distributed.all_reduce_sum(torch.tensor([total_loss, correct, count],
                                                                          dtype=torch.float64)).tolist()
    return total_loss / count, correct / count
