"""ml_collections configs: the MSD task table (``tasks``) and the training defaults (``default``)."""
