"""Sub-commands of the ``controltune`` console script (one module each)."""
