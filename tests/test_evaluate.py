"""``lrp-brain evaluate``: per-image rows and a summary that agree, resuming after a kill, refusing a changed run."""
import csv
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

from lrp_brain.cli import main
from lrp_brain.data import Transform
from lrp_brain.evaluate import METRICS, evaluate, open_source
from lrp_brain.model import default_meta, save_checkpoint, vgg16_small
from lrp_brain.outputs import ResumeError, RowLog
from lrp_brain.phantom import write_phantoms

pytestmark = pytest.mark.zennit_both


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('evaluate')
    data = folder / 'phantoms'
    write_phantoms(data, 40, seed=5, sizes=(64,), quiet=True)
    torch.manual_seed(0)
    model = vgg16_small(width=4)
    meta = {**default_meta('vgg16', 4), 'transform': Transform(size=32).to_dict(), 'input_size': 32}
    checkpoint = folder / 'model.pt'
    save_checkpoint(checkpoint, model, meta)
    return folder, str(data), str(checkpoint)


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def test_cli_writes_rows_and_summary_that_agree(setup):
    folder, data, checkpoint = setup
    out = folder / 'cli'
    result = CliRunner().invoke(main, ['evaluate', '--data', data, '--checkpoint', checkpoint, '--out', str(out),
                                       '--quiet', '--figures', '1', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / 'rows.csv')
    summary = json.loads((out / 'summary.json').read_text())
    source = open_source(checkpoint, data, quiet=True)
    assert [row['file'] for row in rows] == [os.path.relpath(ref, data) for ref in source.split.test]
    assert summary['images'] == len(rows) > 0
    assert set(rows[0]) >= {'file', 'patient', 'label', 'prediction', 'p_meningioma', 'p_glioma', 'p_pituitary',
                            *METRICS}
    for name in METRICS:
        values = [float(row[name]) for row in rows]
        included = [value for value in values if not math.isnan(value)]
        assert summary[name]['overall']['n'] == len(included)
        assert summary[name]['overall']['excluded'] == len(values) - len(included)
        assert summary[name]['overall']['mean'] == pytest.approx(sum(included) / len(included), rel=1e-12)
    for row in rows:
        probabilities = [float(row[f'p_{name}']) for name in ('meningioma', 'glioma', 'pituitary')]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
    assert summary['settings']['low'] == 0. and summary['settings']['high'] == 1.
    assert summary['model'].startswith('checkpoint:')
    assert (out / 'figures' / 'best1.png').stat().st_size > 0 and (out / 'figures' / 'worst1.png').exists()


def test_resume_after_a_kill_gives_the_same_rows(setup):
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    full_rows, _ = evaluate(source, out=str(folder / 'full'), progress=False, batch_size=3)

    # a run killed after 4 images, mid-way through writing the 5th row
    out = folder / 'killed'
    evaluate(source, out=str(out), progress=False, batch_size=3)
    log = out / 'rows.jsonl'
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(''.join(lines[:4]) + lines[4][:17])
    os.unlink(out / 'rows.csv')

    resumed, _ = evaluate(source, out=str(out), progress=False, batch_size=3)
    assert [row['file'] for row in resumed] == [row['file'] for row in full_rows]
    for row, reference in zip(resumed, full_rows):
        for name in METRICS:
            assert row[name] == pytest.approx(reference[name], rel=1e-6, nan_ok=True)
    assert len(read_csv(out / 'rows.csv')) == len(full_rows)
    assert len(log.read_text().splitlines()) == len(full_rows)


def test_resume_with_other_arguments_is_refused(setup):
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    out = str(folder / 'changed')
    evaluate(source, out=out, progress=False, epsilon=0.25)
    with pytest.raises(ResumeError, match='settings'):
        evaluate(source, out=out, progress=False, epsilon=0.5)


def test_row_log_drops_a_torn_line_and_duplicates(tmp_path):
    identity = {'run': 1}
    log = RowLog(tmp_path / 'rows.jsonl', identity, key='id')
    log.append({'id': 'a', 'value': 1})
    log.append({'id': 'a', 'value': 2})
    with open(tmp_path / 'rows.jsonl', 'a') as file:
        file.write('{"id": "b", "val')
    reopened = RowLog(tmp_path / 'rows.jsonl', identity, key='id')
    assert reopened.rows == {'a': {'id': 'a', 'value': 1}}
    reopened.append({'id': 'b', 'value': 3})
    assert [json.loads(line)['id'] for line in (tmp_path / 'rows.jsonl').read_text().splitlines()] == ['a', 'b']
