"""`python -m randteach` (and `torchrun ... -m randteach`): the `randteach` command, `python -m randteach.cli`."""
import runpy

runpy.run_module("randteach.cli", run_name="__main__", alter_sys=True)
