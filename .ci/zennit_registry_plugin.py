"""A pytest plugin that runs Zennit's own attribution tests with the project's composite in Zennit's registry.

Loaded with ``-p zennit_registry_plugin`` (this folder on ``PYTHONPATH``) before Zennit's ``tests/conftest.py`` is
collected, it imports :mod:`lrp_brain`, which registers :class:`~lrp_brain.composites.VGGComposite` as
``zennit.composites.COMPOSITES['lrp_brain_vgg']``; the fixture ``any_composite`` of Zennit's conftest then builds it,
like every registered composite, without arguments and runs it on Zennit's small feed-forward models with N(0, 1)
data. After collection it checks that tests with the project's composite were collected, so the run cannot silently
leave it out.
"""
import pytest
from zennit.composites import COMPOSITES

import lrp_brain


def pytest_report_header(config):
    return f"zennit.composites.COMPOSITES['lrp_brain_vgg'] is {COMPOSITES['lrp_brain_vgg'].__module__}.VGGComposite"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    ours = [item for item in items
            if getattr(getattr(item, 'callspec', None), 'params', {}).get('any_composite') is lrp_brain.VGGComposite]
    if not ours:
        raise pytest.UsageError("no collected test uses COMPOSITES['lrp_brain_vgg']: the plugin was loaded too late, "
                                "or the tests no longer take every registered composite")
    config.pluginmanager.get_plugin('terminalreporter').write_line(
        f"{len(ours)} of the {len(items)} tests use COMPOSITES['lrp_brain_vgg']")
