"""The planning stage: dataset.json reading, dataset fingerprint, U-Net topology and patch, the plan."""
