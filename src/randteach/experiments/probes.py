"""E1, E2 (Tab. 1, Tab. 3, Fig. 1): teacher, student and raw-input probes, linear and k-NN, over training."""
from __future__ import annotations

from .base import Experiment


class Probes(Experiment):
    name = "probes"
    ids = "E1, E2"
    paper = "Tab. 1, Tab. 3, Fig. 1"
    claim = ("a student distilled into its frozen random teacher (no labels, no augmentation) probes better than "
             "the teacher, linearly and with k-NN, and better than the raw pixels, on every data set and encoder.")


EXPERIMENT = Probes()
