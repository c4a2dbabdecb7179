"""nnU-Net v2 interop: its plans and dataset.json (``plans``), its image readers (``imageio``), its
per-case preprocessing (``preprocessing``) and export (``export``), its checkpoints (``checkpoint``) and
its trained-model predictor (``predictor``), reimplemented without importing nnunetv2 or torch
(docs/nnunetv2.md)."""
