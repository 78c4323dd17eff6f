"""lrp-brain: layer-wise relevance propagation for VGG16 brain-tumour MRI classifiers, built on Zennit.

Importing the package registers :class:`~lrp_brain.composites.VGGComposite` in Zennit's composite registry as
``'lrp_brain_vgg'``, so ``zennit.composites.COMPOSITES['lrp_brain_vgg'](epsilon=.25, gamma=.1)`` works in any
Zennit code.
"""
__version__ = '0.1.0'

from lrp_brain.composites import VGGComposite, rule_table, zbox_bounds  # noqa: E402

__all__ = ['VGGComposite', 'rule_table', 'zbox_bounds', '__version__']
