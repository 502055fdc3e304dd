"""Data: readers, preprocessing, dataset adapters, shards and the training loader."""
