"""E6 (App. B, Fig. 10-12): ablations of the projector: the encoder's normalization layers, the parts of the
L2 bottleneck (wn1, lin1, fn1, wn2, lin2, fn2), and the output dimension m."""
from __future__ import annotations

from .base import Experiment


class HeadAblations(Experiment):
    name = "head-ablations"
    ids = "E6"
    paper = "App. B, Fig. 10-12"
    claim = ("the effect survives batch-independent normalization and no normalization (slower); the default "
             "bottleneck is best and removing feature normalization hurts more than removing weight "
             "normalization; a large m is not crucial, but there is a phase transition at the bottleneck "
             "dimension m = 256.")


EXPERIMENT = HeadAblations()
