"""Analyses of trained runs, each a module of plain-argument functions that the commands and the
experiments wrap. Where a run lands (random-teacher paper, Sec. 5-6):

- params.py      parameter vectors, planes through three of them, functional evaluation at a point
- landscape.py   loss / probe / embedding-KL landscapes on a plane (E9)
- supervised.py  supervised training from any checkpoint (the E10/E11 recipe)
- imp.py         iterative magnitude pruning with rewinding: lottery tickets (E10)
- lmc.py         linear mode connectivity of supervised runs from one start (E11)

The escaping paper's analyses (LR range test, escape dynamics, signal propagation) have their own modules here.
"""
