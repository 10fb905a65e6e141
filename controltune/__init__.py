"""controltune: the optimal-control theory of delta tuning of pretrained Transformers.

Importing the package sets the Hugging Face offline switches (model hubs are
never contacted; a missing file costs ~45 s of retries otherwise), unless the
user has set them already.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .system import ResidualSystem, Trajectory  # noqa: E402
from .zoo import load_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ResidualSystem", "Trajectory", "load_model", "__version__"]
