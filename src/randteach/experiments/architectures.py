"""E7 (App. C.2, Tab. 5): the effect across encoders: VGG11-19, ResNet20/56/18/34/50, ViT tiny ... base."""
from __future__ import annotations

from .base import Experiment


class Architectures(Experiment):
    name = "architectures"
    ids = "E7"
    paper = "App. C.2, Tab. 5"
    claim = ("the student outperforms its random teacher for every architecture; the less inductive bias "
             "(ViTs), the smaller the gain, but it never breaks down.")


EXPERIMENT = Architectures()
