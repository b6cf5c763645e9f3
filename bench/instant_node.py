"""Launch `allerac` with the BENCHMARK-ONLY instant backend registered.

    python bench/instant_node.py up --home DIR --config CONFIG ...

A config model with `backend = "bench_instant"` streams tokens without computing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from instant_backend import InstantBackend

from node.cli import main
from node.serving.backends import FACTORIES

FACTORIES["bench_instant"] = InstantBackend  # type: ignore[assignment]

if __name__ == "__main__":
    main()
