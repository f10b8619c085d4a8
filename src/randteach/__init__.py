"""randteach: distill a student into a frozen, randomly initialized teacher and measure what it learns.

Implements *Random Teachers are Good Teachers* (Sarnthein et al., ICML 2023) and *Escaping Random
Teacher Initialization Enhances Signal Propagation and Representation* (Sarnthein et al.).
"""
__version__ = "0.1.0"

from .api import distill, imp, landscape, lmc, probe, signal_report
from .runs.export import load_encoder

__all__ = ["distill", "probe", "signal_report", "landscape", "imp", "lmc", "load_encoder", "__version__"]
