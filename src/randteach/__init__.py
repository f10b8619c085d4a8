"""randteach: distill a student into a frozen, randomly initialized teacher and measure what it learns.

Implements *Random Teachers are Good Teachers* (Sarnthein et al., ICML 2023) and *Escaping Random
Teacher Initialization Enhances Signal Propagation and Representation* (Sarnthein et al.).
"""
__version__ = "0.1.0"

# `randteach.distill(...)` and `randteach.probe(...)` are the Python API; the modules of the same name
# (the loop, randteach/distill.py, and the probes, randteach/probe.py) are imported first so that later
# `from randteach.distill import ...` / `from randteach.probe import ...` statements find them in sys.modules.
from . import distill as _distill_module  # noqa: E402,F401
from . import probe as _probe_module  # noqa: E402,F401
from .api import distill, imp, landscape, lmc, probe, signal_report  # noqa: E402
from .export import load_encoder  # noqa: E402

__all__ = ["distill", "probe", "signal_report", "landscape", "imp", "lmc", "load_encoder", "__version__"]
