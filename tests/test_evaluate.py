"""``lrp-brain evaluate``: per-image rows and a summary that agree, resuming after a kill, refusing a changed run."""
import json
import math
import os
import signal

import pytest
from click.testing import CliRunner

from lrp_brain.cli import main
from lrp_brain.evaluate import evaluate
from lrp_brain.metrics import METRICS
from lrp_brain.sources import open_source
from lrp_brain.outputs import ResumeError, RowLog

from command_setup import JOBS, read_csv, run, write_setup

pytestmark = pytest.mark.zennit_both


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('evaluate')
    return (folder, *write_setup(folder))


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


@pytest.mark.parametrize('resume_processes', [None, 2], ids=['resumed alone', 'resumed under torchrun'])
def test_killed_evaluate_resumes_to_the_same_rows(setup, resume_processes):
    """SIGKILL while the 5th row is half written (batches of 3: the 2nd batch has one row on disk), then rerun: the
    torn line is dropped, the 2nd batch recomputed whole, and the rows equal an uninterrupted run's, one per image."""
    folder, data, checkpoint = setup
    command = ['evaluate', '--data', data, '--checkpoint', checkpoint, '--quiet', '--device', 'cpu',
               '--batch-size', '3', '--figures', '0']
    reference = folder / 'uninterrupted'
    if not (reference / 'rows.csv').exists():
        run(['-m', 'lrp_brain', *command, '--out', str(reference)])
    out = folder / f'killed-{resume_processes}'
    killed = run([JOBS, 'killed', '4', *command, '--out', str(out)], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    lines = (out / 'rows.jsonl').read_text().split('\n')
    assert len(lines) == 5 and lines[-1] == '{"file": "half a row' and not (out / 'rows.csv').exists()

    run(['-m', 'lrp_brain', *command, '--out', str(out)], processes=resume_processes)
    assert read_csv(out / 'rows.csv') == read_csv(reference / 'rows.csv')
    files = [json.loads(line)['file'] for line in (out / 'rows.jsonl').read_text().splitlines()]
    assert sorted(files) == sorted(row['file'] for row in read_csv(reference / 'rows.csv'))
    assert len(files) == len(set(files)) == 14


def test_resume_with_other_arguments_is_refused(setup):
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    out = str(folder / 'changed')
    evaluate(source, out=out, progress=False, epsilon=0.25)
    with pytest.raises(ResumeError, match='settings'):
        evaluate(source, out=out, progress=False, epsilon=0.5)
    with pytest.raises(ResumeError, match='batch_size'):
        evaluate(source, out=out, progress=False, epsilon=0.25, batch_size=5)


def test_resume_under_other_library_versions_is_refused(setup, monkeypatch):
    import lrp_brain.outputs

    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    out = str(folder / 'upgraded')
    evaluate(source, out=out, progress=False)
    versions = lrp_brain.outputs.library_versions()
    monkeypatch.setattr(lrp_brain.outputs, 'library_versions', lambda: {**versions, 'zennit': '9.9.9'})
    with pytest.raises(ResumeError, match='holds an unfinished run with different versions'):
        evaluate(source, out=out, progress=False)


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


# --- faithfulness --------------------------------------------------------------------------------------------------

def test_faithfulness_columns_are_morf_lerf_of_the_explained_maps(setup):
    """The rows' MoRF AUC, LeRF AUC and gap are those of region perturbation applied to the very maps explain gives
    (recomputed here image by image, one image per call), and the summary's means are the rows' means."""
    import torch

    from lrp_brain.explain import explain
    from lrp_brain.faithfulness import DEFAULTS, morf_lerf

    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    rows, summary = evaluate(source, 'test', progress=False, batch_size=4, perturbation={'steps': 6})
    dataset = source.dataset('test')
    low, high = source.bounds
    for index in (0, len(rows) - 1):
        item = dataset[index]
        image, label = item['image'][None], torch.tensor([item['label']])
        relevance = explain(source.model, image, labels=label, low=low, high=high).relevance
        curves = morf_lerf(source.model, image, relevance, label, **{**DEFAULTS, 'steps': 6})
        assert rows[index]['morf_auc'] == pytest.approx(float(curves.morf_auc[0]), rel=1e-5)
        assert rows[index]['lerf_auc'] == pytest.approx(float(curves.lerf_auc[0]), rel=1e-5)
        assert rows[index]['faithfulness_gap'] == pytest.approx(float(curves.gap[0]), rel=1e-5, abs=1e-6)
    for name in ('morf_auc', 'lerf_auc', 'faithfulness_gap'):
        values = [row[name] for row in rows]
        assert summary[name]['overall']['mean'] == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert summary['settings']['perturbation'] == {**DEFAULTS, 'steps': 6}
    assert summary['settings']['criteria'] == ['localisation', 'faithfulness']


def test_metrics_choose_what_is_scored(setup):
    folder, data, checkpoint = setup
    source = open_source(checkpoint, data, quiet=True)
    localisation, summary = evaluate(source, 'test', progress=False, criteria='localisation')
    assert 'iou' in localisation[0] and 'faithfulness_gap' not in localisation[0] and 'faithfulness_gap' not in summary
    faithful, summary = evaluate(source, 'test', progress=False, criteria='faithfulness', perturbation={'steps': 4})
    assert 'faithfulness_gap' in faithful[0] and 'iou' not in faithful[0] and 'flags' not in faithful[0]
    assert 'iou' not in summary and summary['images'] == len(faithful)
    with pytest.raises(ValueError, match="metrics must be localisation, faithfulness or both, got 'iou'"):
        evaluate(source, 'test', progress=False, criteria='iou')
    with pytest.raises(ValueError, match=r"unknown perturbation settings \['patch'\]"):
        evaluate(source, 'test', progress=False, perturbation={'patch': 4})


def test_cli_evaluate_faithfulness_only(setup):
    folder, data, checkpoint = setup
    out = folder / 'faithful'
    result = CliRunner().invoke(main, ['evaluate', '--data', data, '--checkpoint', checkpoint, '--out', str(out),
                                       '--quiet', '--device', 'cpu', '--metrics', 'faithfulness', '--steps', '4',
                                       '--baseline', '0'])
    assert result.exit_code == 0, result.output
    assert 'faithfulness_gap' in result.output and 'iou' not in result.output
    rows = read_csv(out / 'rows.csv')
    assert set(rows[0]) >= {'morf_auc', 'lerf_auc', 'faithfulness_gap'} and 'iou' not in rows[0]
    assert json.loads((out / 'summary.json').read_text())['settings']['perturbation']['baseline'] == 0.
