"""The preprocessing stage: per-case crop / resample / normalise / pad (``case``), the resampling itself
(``resample``), a whole dataset to ``<task>_<dim>d/`` (``driver``), and the inverse export to the source."""
