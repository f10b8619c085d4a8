"""What a launcher told this process: torchrun's RANK, WORLD_SIZE, LOCAL_RANK and TORCHELASTIC_RUN_ID, read
here and nowhere else.

Outside torchrun the process is rank 0 of a world of one, with no local rank."""
from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int | None:
    """The process's index on its node under torchrun, None outside it."""
    return int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None


def torchrun() -> bool:
    """Whether torchrun started this process (other launchers, srun say, may set the ranks too)."""
    return "TORCHELASTIC_RUN_ID" in os.environ
