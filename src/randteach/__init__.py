"""randteach: distill a student into a frozen, randomly initialized teacher and measure what it learns.

Implements *Random Teachers are Good Teachers* (Sarnthein et al., ICML 2023) and *Escaping Random
Teacher Initialization Enhances Signal Propagation and Representation* (Sarnthein et al.).
"""
__version__ = "0.1.0"

# `randteach.distill(...)` is the Python API; the loop itself lives in the module randteach/distill.py,
# imported first so that later `from randteach.distill import ...` statements find it in sys.modules.
from . import distill as _distill_module  # noqa: E402,F401
from .api import distill  # noqa: E402

__all__ = ["distill", "__version__"]
