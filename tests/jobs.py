"""Jobs that tests start in other processes (under ``torchrun`` or alone); each prints ``ok <rank>`` at the end.

``python tests/torchrun_job.py errors``
    An error raised in one process comes out of :func:`~lrp_brain.distributed.gather`,
    :func:`~lrp_brain.distributed.on_main` and :func:`~lrp_brain.distributed.main_first` in every process.
``python tests/torchrun_job.py train DATA OUT``
    :func:`lrp_brain.train.train` of a small VGG16 without dropout, for comparison with one process.
``python tests/jobs.py killed ROWS ARGUMENT...``
    ``lrp-brain ARGUMENT...`` that kills itself (SIGKILL) while writing row ``ROWS + 1`` of its row log: half the
    line is on disk, as when a kill strikes mid-write.
"""
import os
import signal
import sys

import torch

from lrp_brain import distributed


def errors():
    rank, size = distributed.rank(), distributed.world_size()
    assert size == 2, size
    assert distributed.gather(lambda: rank * 10) == [0, 10]

    def fails_in_rank_1():
        if rank == 1:
            raise KeyError('rank 1 failed')
        return rank

    for call in (lambda: distributed.gather(fails_in_rank_1),
                 lambda: distributed.on_main(lambda: 1 / 0)):
        try:
            call()
        except (KeyError, ZeroDivisionError) as error:
            print(f'rank {rank} raised {type(error).__name__}: {error}')
        else:
            raise AssertionError('no error raised')
    try:
        with distributed.main_first():
            if rank == 0:
                raise ValueError('the cache could not be written')
            raise AssertionError('rank 1 ran the body after rank 0 failed')
    except ValueError as error:
        print(f'rank {rank} raised ValueError: {error}')
    batches = list(range(5))
    dealt = distributed.gather(lambda: list(distributed.rounds(batches)))
    assert dealt == [[0, 2, 4], [1, 3, None]], dealt


def train(data, out):
    import lrp_brain.train
    from lrp_brain.model import build_model

    def without_dropout(*args, **kwargs):
        model = build_model(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.
        return model

    lrp_brain.train.build_model = without_dropout  # dropout draws differ between 1 and 2 processes; nothing else
    lrp_brain.train.train(data, out, arch='vgg16', width=4, size=32, epochs=2, batch_size=7, lr=1e-3,
                          device='cpu', progress=False)


def killed(rows, *arguments):
    from lrp_brain.cli import main
    from lrp_brain.outputs import RowLog

    append = RowLog.append

    def append_then_die(log, row):
        if len(log) == int(rows):
            with open(log.path, 'a', encoding='utf-8') as file:
                file.write('{"file": "half a row')
            os.kill(os.getpid(), signal.SIGKILL)
        append(log, row)

    RowLog.append = append_then_die
    main(list(arguments))


if __name__ == '__main__':
    job, arguments = sys.argv[1], sys.argv[2:]
    if job == 'killed':
        killed(*arguments)
    distributed.init('cpu')
    {'errors': errors, 'train': train}[job](*arguments)
    print(f'ok {distributed.rank()}')
    distributed.finish()
