"""Analyses of trained runs, each a module of plain-argument functions that the commands and the
experiments wrap. Where a run lands (random-teacher paper, Sec. 5-6):

- params.py      parameter vectors, planes through three of them, functional evaluation at a point
- landscape.py   loss / probe / embedding-KL landscapes on a plane (Sarnthein et al. 2023, Fig. 5)
- supervised.py  supervised training from any checkpoint (the recipe of Sarnthein et al. 2023, App. E.5)
- imp.py         iterative magnitude pruning with rewinding: lottery tickets (Sarnthein et al. 2023, Fig. 8)
- lmc.py         linear mode connectivity of supervised runs from one start (Sarnthein et al. 2023, Fig. 9)

The escaping paper's analyses (LR range test, escape dynamics, signal propagation) have their own modules here.
"""
