"""Running one job in several processes, on several GPUs or machines, with ``torch.distributed`` and ``torchrun``.

``torchrun --nproc-per-node N -m lrp_brain evaluate|sweep|train ...`` starts N copies of a command; each learns its
rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...), and
:func:`init` joins them in one process group: NCCL between GPUs, gloo on CPUs. Multi-node runs use torchrun's
rendezvous flags (``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint host:port``); all nodes must see the data,
the model and the output folder under the same paths.

The loops share work in *rounds*: the fixed batches of a job are dealt out, one per process per round
(:func:`rounds`), and after each round every process receives every process's results (:func:`gather`). Which batch
an image is in never depends on the number of processes, so the numbers are those of a single-process run. Rank 0
alone reads and writes files (:func:`on_main`); the others wait for its answer. An error in any process is raised
in all of them (instead of leaving the others waiting in a collective call forever).

Without torchrun (or with one process) every function here is the trivial single-process version, so the loops
have one code path.
"""
import os
import pickle
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm


class DistributedError(RuntimeError):
    """An error of a process that could not be sent to the others as itself (it cannot be pickled): its type and
    message, raised in every process."""


def launched():
    """Whether this process was started by ``torchrun`` (or another launcher) as one of several."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def active():
    """Whether a process group of more than one process is in use."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    """This process's rank in the job (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size():
    """The number of processes of the job (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main():
    """Whether this process is rank 0, the one that writes outputs and prints."""
    return rank() == 0


def init(device='auto'):
    """Join the process group ``torchrun`` prepared, if there is one, and return this process's device.

    Parameters
    ----------
    device: str or torch.device
        ``'auto'``, ``'cpu'`` or ``'cuda'`` (see :func:`lrp_brain.model.resolve_device`). Under torchrun, ``'cuda'``
        becomes ``cuda:<LOCAL_RANK>``: one GPU per process.

    Returns
    -------
    torch.device
        Where this process computes. The backend is NCCL for CUDA devices and gloo otherwise.
    """
    from lrp_brain.model import resolve_device

    device = resolve_device(device)
    if not launched():
        return device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return device


def finish(wait=True):
    """Leave the process group; with ``wait``, after a last barrier, so no process exits while another still sends
    (after an error, the others may never reach it)."""
    if wait and active():
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _outcome(function):
    """Run ``function`` and return ``(True, result)`` or ``(False, the exception)``."""
    try:
        return True, function()
    except Exception as error:  # handed to every process, raised there
        return False, error


def _sendable(outcome):
    """The outcome with an exception that cannot be pickled replaced by a :class:`DistributedError` saying it."""
    ok, value = outcome
    return outcome if ok else (False, _picklable(value))


def _picklable(error):
    try:
        pickle.dumps(error)
    except Exception:
        return DistributedError(f'{type(error).__name__}: {error}')
    return error


def _raise_failure(outcomes):
    """Raise the error of the first failed ``(ok, value)`` outcome, if any."""
    for ok, value in outcomes:
        if not ok:
            raise value


def _from_main(outcome):
    """Rank 0's ``outcome``, broadcast to every process (the others pass ``None``)."""
    if active():
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    return outcome


def gather(function):
    """Run ``function()`` in every process and return all results, in rank order, to every process.

    Raises
    ------
    Exception
        The error of the first process (by rank) whose ``function`` raised, in every process.
    """
    outcome = _outcome(function)
    outcomes = [outcome]
    if active():
        outcomes = [None] * world_size()
        dist.all_gather_object(outcomes, _sendable(outcome))
    _raise_failure([outcome] + outcomes)  # a process that failed raises its own error
    return [value for _, value in outcomes]


def on_main(function):
    """Run ``function()`` in rank 0 only and return its result in every process (its error, raised in all)."""
    if is_main():
        outcome = _outcome(function)
        _from_main(_sendable(outcome))
    else:
        outcome = _from_main(None)
    _raise_failure([outcome])
    return outcome[1]


@contextmanager
def main_first():
    """Run the body in rank 0 first, then in the others: for work that fills a cache or writes a file the others
    then read (a phantom set, a split file). A failure in rank 0 is raised in the others before they start."""
    if not active():
        yield
    elif is_main():
        try:
            yield
        except Exception as error:
            _from_main((False, _picklable(error)))
            raise
        _from_main((True, None))
    else:
        _raise_failure([_from_main(None)])
        yield


@contextmanager
def held_by_main(context):
    """Hold the context manager ``context()`` in rank 0 only for the body (e.g. the lock of the output folder, which
    rank 0 alone writes); an error entering it is raised in every process."""
    with ExitStack() as stack:
        on_main(lambda: stack.enter_context(context()) and None)
        yield


def rounds(batches):
    """Deal ``batches`` out: yield, per round, the batch this process computes (``None`` when none is left).

    Every process takes part in every round (``ceil(len(batches) / world_size())`` of them), so the collective call
    that ends a round is made by all.
    """
    count, position = world_size(), rank()
    for start in range(0, len(batches), count):
        index = start + position
        yield batches[index] if index < len(batches) else None


def all_reduce_sum(values):
    """Sum a tensor over the processes (returned; the input is left alone)."""
    values = values.clone()
    if active():
        device = values.device
        backend_device = torch.device('cuda', torch.cuda.current_device()) \
            if dist.get_backend() == 'nccl' else torch.device('cpu')
        values = values.to(backend_device)
        dist.all_reduce(values)
        values = values.to(device)
    return values


def batch_rows(keys, batch_size, compute, *, log_path=None, identity=None, key='file', progress=True,
               description=None, after_round=None, round_batches=1):
    """Compute one row per key in fixed batches, dealt out to the processes, resuming from a row log.

    The batches are consecutive slices of ``keys`` of ``batch_size``; a batch with any row missing from the log is
    computed whole, so every row is computed in the batch it has in an uninterrupted single-process run (the batch
    can change float results in the last bits). Rank 0 appends each round's rows to the log before the next round.

    Parameters
    ----------
    keys: list of str
        The units of work, in output order (e.g. image files); unique.
    batch_size: int
    compute: callable
        ``compute(indices)`` returns the rows (dicts with ``row[key]``) of ``keys[i] for i in indices``.
    log_path: str, optional
        The :class:`~lrp_brain.outputs.RowLog` to resume from and append to; none if ``None``.
    identity: dict
        The run's identity (see :class:`~lrp_brain.outputs.RowLog`); a log of another run is refused.
    key: str
        The row field holding the key.
    progress: bool
        Show a progress bar (rank 0 only).
    description: str, optional
        The progress bar's label.
    after_round: callable, optional
        ``after_round(rows)``, called in every process after each group of ``round_batches`` consecutive batches
        with the rows of all keys up to the group's end, in order (logged rows included: a resumed run makes the
        same calls); what ``compute`` does in the next group may depend on it (e.g. a race that drops settings).
        The groups never depend on the number of processes or on the log.
    round_batches: int
        Batches per group of ``after_round``.

    Returns
    -------
    list of dict
        The rows, in the order of ``keys``, in every process.
    """
    from lrp_brain.outputs import RowLog

    log = None

    def open_log():
        nonlocal log
        log = RowLog(log_path, identity, key=key)
        return log.rows

    rows = dict(on_main(open_log)) if log_path is not None else {}
    batches = [list(range(start, min(start + batch_size, len(keys)))) for start in range(0, len(keys), batch_size)]
    groups = [batches] if after_round is None else \
        [batches[start:start + round_batches] for start in range(0, len(batches), round_batches)]
    missing = [[indices for indices in group if any(keys[index] not in rows for index in indices)] for group in groups]
    with tqdm(total=len(keys), initial=len(keys) - sum(len(indices) for group in missing for indices in group),
              disable=not (progress and is_main()), desc=description, unit='image') as bar:
        for group, batches in zip(groups, missing):
            for indices in rounds(batches):
                for computed in gather(lambda: [] if indices is None else compute(indices)):
                    for row in computed:
                        rows.setdefault(row[key], row)
                        if log is not None:
                            log.append(row)
                    bar.update(len(computed))
            if after_round is not None and group:
                after_round([rows[name] for name in keys[:group[-1][-1] + 1]])
    return [rows[name] for name in keys]
