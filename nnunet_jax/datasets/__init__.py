"""Raw datasets from elsewhere: the embedded synthetic task and the MSD download."""
