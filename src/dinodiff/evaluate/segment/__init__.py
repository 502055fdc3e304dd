"""Zero-shot lung segmentation (DiffSeg): data (images + lung masks) -> attention (UNet self-attention
capture) -> diffseg (aggregation and merging) -> metrics (Dice, baselines) -> report (tables, overlays)
-> stage (the grid search, the `segment` command)."""
