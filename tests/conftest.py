import zennit

from lrp_brain.versions import zennit_version


def pytest_report_header(config):
    return f'zennit {zennit_version()} from {zennit.__file__}'
