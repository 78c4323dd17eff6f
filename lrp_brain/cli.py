"""The ``lrp-brain`` command line: thin click commands over the Python API.

Each command parses its arguments, calls the API and prints; no logic lives here.
"""
import click


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(package_name='lrp-brain')
def main():
    """LRP explanations for VGG16 brain-tumour MRI classifiers, and how well they land on the tumour."""


# Commands are added below, one block per command, in the order: explain, evaluate, sweep, train, check, synth,
# data, bench.
