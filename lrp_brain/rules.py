"""LRP rules as Zennit hooks. (Temporary: stock Zennit rules until the fast rules land.)"""
import torch
from zennit import rules as zennit_rules
from zennit.rules import Epsilon, Gamma, ZBox  # noqa: F401


class StdStabilizer:
    """Stabilise a denominator ``z`` by ε times its standard deviation: ``z + sign(z)·ε·std(z)``.

    The standard deviation is the population one (``correction=0``) over all but the batch dimension, so every
    sample gets its own ε; ``sign(0) = +1`` as in Zennit.
    """
    def __init__(self, epsilon):
        self.epsilon = epsilon

    def __call__(self, output):
        dims = tuple(range(1, output.ndim))
        scale = output.std(dim=dims, keepdim=True, correction=0)
        sign = (output >= 0).to(output) * 2 - 1
        return output + sign * self.epsilon * scale
