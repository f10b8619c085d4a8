"""Analyses of trained runs, each a module of plain-argument functions that the commands and the
experiments wrap. Where a run lands (random-teacher paper, Sec. 5-6):

- params.py         parameter vectors, planes through three of them, functional evaluation at a point
- landscape.py      loss / probe / embedding-KL landscapes on a plane (E9)
- imp.py            iterative magnitude pruning with rewinding: lottery tickets (E10)
- lmc.py            linear mode connectivity of supervised runs from one start (E11)

How it escapes (escaping paper):

- lr_range.py       the LR range test, teacher-student vs supervised (E12)
- escape.py         escape dynamics: step-size, batch-size and stabilization sweeps (E13, E15)
- signal_propagation.py  effective rank, dead neurons, condition number, Fisher metrics of a layer (E14)
- signal_layers.py  those metrics for every layer of a run's checkpoints (E14)

The supervised training they share is `randteach.train.supervised`.
"""
