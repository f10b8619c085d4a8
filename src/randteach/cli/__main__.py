"""`python -m randteach.cli`: the `randteach` command."""
import os
import sys

from randteach.cli import main

# `python -m randteach.cli` puts the current folder first on sys.path, which would make any folder
# there (a downloaded run, say) importable; randteach never imports from it unless asked.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]
sys.exit(main())
