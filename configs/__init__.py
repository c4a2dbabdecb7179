"""ml_collections configs: the MSD task table (``tasks``) and the training/inference defaults (``default``)."""
