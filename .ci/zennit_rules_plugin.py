"""A pytest plugin that runs Zennit's own rule tests against the project's fast rules.

Loaded with ``-p zennit_rules_plugin`` (this folder on ``PYTHONPATH``) before Zennit's ``tests/test_rules.py`` is
collected, it rebinds ``zennit.rules.Epsilon``, ``Gamma`` and ``ZBox`` to :mod:`lrp_brain.rules`' classes, so the test
module's ``from zennit.rules import ...`` picks up the project's rules, which Zennit's tests then compare with their
own re-implementations of the formulas. After collection it checks that every collected module that names one of the
rules holds the project's class, so the run cannot silently test Zennit against itself.
"""
import pytest
import zennit.rules

from lrp_brain import rules

REBOUND = ('Epsilon', 'Gamma', 'ZBox')

for _name in REBOUND:
    setattr(zennit.rules, _name, getattr(rules, _name))


def pytest_report_header(config):
    return f'zennit.rules.{{{", ".join(REBOUND)}}} rebound to lrp_brain.rules'


def pytest_collection_modifyitems(session, config, items):
    modules = {item.module for item in items if getattr(item, 'module', None) is not None}
    for module in modules:
        for name in REBOUND:
            if name in vars(module) and vars(module)[name] is not getattr(rules, name):
                raise pytest.UsageError(
                    f'{module.__name__}.{name} is not lrp_brain.rules.{name}: the plugin was loaded too late'
                )
