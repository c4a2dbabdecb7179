"""Case index, fold split and the input pipelines."""
