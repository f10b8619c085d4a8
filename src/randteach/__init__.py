"""randteach: distill a student into a frozen, randomly initialized teacher and measure what it learns.

Implements *Random Teachers are Good Teachers* (Sarnthein et al., ICML 2023) and *Escaping Random
Teacher Initialization Enhances Signal Propagation and Representation* (Sarnthein et al.).
"""
__version__ = "0.1.0"
