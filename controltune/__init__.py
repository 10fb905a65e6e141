"""controltune: the optimal-control theory of delta tuning of pretrained Transformers.

The whole path model → system → controller → co-states → check is one import::

    import controltune as ct
    loaded = ct.load_model("minilm", dtype="float64")
    system = ct.ResidualSystem(loaded, num_labels=2)
    ct.build("lora", system, rank=8, targets=["q", "v"])
    batch = ct.labelled_batch(loaded, ["a fine film", "dull"], [1, 0])
    report = ct.verify(system, batch, solution=ct.solve_costate(system, batch))

Importing the package sets the Hugging Face offline switches (model hubs are
never contacted; a missing file costs ~45 s of retries otherwise), unless the
user has set them already.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ._version import __version__  # noqa: E402
from .batching import labelled_batch  # noqa: E402
from .controllers import build  # noqa: E402
from .pmp import solve_costate  # noqa: E402
from .system import ResidualSystem, Trajectory  # noqa: E402
from .verification import verify  # noqa: E402
from .zoo import load_model  # noqa: E402

__all__ = ["ResidualSystem", "Trajectory", "build", "labelled_batch", "load_model", "solve_costate", "verify",
           "__version__"]
