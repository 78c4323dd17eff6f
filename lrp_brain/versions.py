"""Versions of the libraries a result depends on, recorded in every output and printed by ``lrp-brain bench``."""
import platform
from importlib import metadata

import numpy
import torch


def zennit_version():
    """Return the version of the zennit that is imported (not merely installed).

    zennit 1.0.0 ships ``zennit.version``; 0.5.1 does not, so its installed metadata is asked instead.
    """
    try:
        from zennit.version import __version__
        return __version__
    except ImportError:
        return metadata.version('zennit')


def zennit_major_minor():
    """Return ``(major, minor)`` of the imported zennit, e.g. ``(0, 5)`` or ``(1, 0)``."""
    major, minor = zennit_version().split('.')[:2]
    return int(major), int(minor)


def library_versions():
    """Return a dict of the versions that decide a result: python, torch, torchvision, zennit, numpy, lrp_brain."""
    import torchvision
    from lrp_brain import __version__
    return {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'torchvision': torchvision.__version__,
        'zennit': zennit_version(),
        'numpy': numpy.__version__,
        'lrp_brain': __version__,
    }
