"""``lrp-brain bench`` and :func:`lrp_brain.bench.run_bench`, run tiny: every method's row is there, timed, with the
gradient as the 1.00× reference; the memory measurement sees what a call allocates; bad settings are refused."""
import pytest
import torch
from click.testing import CliRunner

from lrp_brain import bench
from lrp_brain.cli import main

pytestmark = [pytest.mark.zennit_both, pytest.mark.usefixtures('single_threaded')]

METHODS = ['gradient', 'zennit EpsilonGammaBox', 'zennit rules, seed mapping', 'captum LRP', 'lrp_brain VGGComposite',
           'lrp_brain sweep', 'faithfulness MoRF+LeRF']


def expected_methods():
    try:
        import captum  # noqa: F401
    except ImportError:
        return [method for method in METHODS if method != 'captum LRP']
    return METHODS


@pytest.fixture(scope='module')
def tiny_run():
    """``(result, torch threads before, threads after)`` of one tiny benchmark run with one thread."""
    before = torch.get_num_threads()
    result = bench.run_bench(size=32, repeats=2, width=4, warmup=0, threads=1, quiet=True)
    return result, before, torch.get_num_threads()


@pytest.fixture
def tiny_result(tiny_run):
    return tiny_run[0]


def test_every_method_has_a_timed_row(tiny_result):
    rows = {row.method: row for row in tiny_result.rows}
    assert list(rows) == expected_methods()
    for row in tiny_result.rows:
        assert 0 < row.best_seconds <= row.seconds
        assert row.images_per_second == pytest.approx(1 / row.seconds)
        assert row.ratio == pytest.approx(row.seconds / rows['gradient'].seconds)
        assert row.peak_memory > 0
    assert rows['gradient'].ratio == 1.


def test_settings_versions_and_table(tiny_run, tiny_result):
    assert tiny_run[1] == tiny_run[2]
    assert tiny_result.settings == dict(arch='vgg16', width=4, batch=1, size=32, repeats=2, warmup=0, seed=0,
                                        device='cpu', threads=1)
    assert {'torch', 'zennit', 'lrp_brain'} <= set(tiny_result.versions)
    table = bench.format_bench(tiny_result)
    for method in expected_methods():
        assert method in table
    assert 'peak memory' in table and tiny_result.device in table
    assert tiny_result.versions['zennit'] in table
    # the study estimate: the full sweep once, then one raced line per objective's measured drop-out curve
    costs = {objective: bench.study_cost(tiny_result, curve) for objective, curve in bench.RACE_SURVIVAL.items()}
    lines = table.splitlines()
    assert lines[-5].startswith(f'study estimate on {tiny_result.device}: 121 settings x (460 validation + 460 test')
    assert lines[-4] == f'  full sweep: {costs["iou"].full_hours:.2f} h'
    assert [line.split(':')[0] for line in lines[-4:]] == ['  full sweep'] + [
        f'  raced by {objective} (its demo drop-out curve, chosen setting alone on test)' for objective in costs]
    assert costs['iou'].race_fraction < costs['faithfulness'].race_fraction < 1


def test_cpu_peak_memory_counts_what_a_call_holds_at_once():
    """Three 1 MiB float32 tensors alive together, then freed: a peak of 3 MiB (plus the scalar results)."""
    def call(images, targets):
        first, second = torch.ones(2 ** 18), torch.ones(2 ** 18)
        third = first + second
        del first, second
        return third.sum()

    peak = bench.peak_memory(call, None, None, torch.device('cpu'))
    assert 3 * 2 ** 20 <= peak < 3 * 2 ** 20 + 4096


def test_bench_model_is_seeded_with_small_nonzero_biases():
    first, second = bench.bench_model(width=4, seed=3), bench.bench_model(width=4, seed=3)
    assert not first.training
    for (name, one), two in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(one, two), name
    biases = [module.bias for module in first.modules() if getattr(module, 'bias', None) is not None]
    assert all(bias.abs().max() > 0 and bias.abs().max() < 10 * bench.BIAS_STD for bias in biases)


def test_cli_passes_the_options_and_prints_the_table(tiny_result, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, 'run_bench', lambda **options: calls.append(options) or tiny_result)
    result = CliRunner().invoke(main, ['bench', '--size', '32', '--width', '4', '--repeats', '2', '--warmup', '0',
                                       '--batch', '1', '--device', 'cpu', '--seed', '0', '--threads', '1',
                                       '--no-memory', '--quiet'])
    assert result.exit_code == 0, result.output
    assert calls == [dict(device='cpu', batch=1, size=32, repeats=2, arch='vgg16', width=4, seed=0, warmup=0,
                          memory=False, threads=1, quiet=True)]
    assert result.output.strip() == bench.format_bench(tiny_result)
    gradient_line = next(line for line in result.output.splitlines() if line.startswith('gradient'))
    assert gradient_line.split()[3] == '1.00'


@pytest.mark.parametrize('options, message', [
    ({'batch': 0}, 'batch'), ({'repeats': 0}, 'repeats'), ({'size': 8}, 'size'), ({'warmup': -1}, 'warmup'),
    ({'threads': 0}, 'threads'), ({'device': 'tpu'}, 'tpu'),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(bench.BenchError, match=message):
        bench.run_bench(**options)


def test_cli_reports_a_bad_architecture():
    result = CliRunner().invoke(main, ['bench', '--arch', 'resnet18', '--size', '32', '--no-memory', '--quiet'])
    assert result.exit_code != 0 and 'resnet18' in result.output
