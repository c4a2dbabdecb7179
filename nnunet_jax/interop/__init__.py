"""Adapters at the edge: weights and models of other implementations (PyTorch/MONAI, nnU-Net v2)."""
