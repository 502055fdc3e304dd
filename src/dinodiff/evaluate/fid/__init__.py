"""Image quality: features (XRV, Inception, DINOv2, RAD-DINO) -> images (what is scored) -> stage (FID/KID,
the `fid` command) -> sweep (every checkpoint of a run, best/ selection, the training-time hook)."""
