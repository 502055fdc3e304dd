"""Zero-shot lung segmentation: data (images + lung masks) -> attention (UNet self-attention capture) ->
diffseg (aggregation and KL merging) | diffcut (recursive normalised cut on the encoder's self-attention
outputs) -> metrics (Dice, baselines) -> split (tuning / report images) -> grid (passes, cells, cache) ->
report (tables) + overlays (figures) -> stage (the `segment` command). locality: how structured the maps are."""
