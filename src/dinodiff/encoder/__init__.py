"""Stage: self-supervised DINO pretraining of a domain encoder (`pretrain-encoder`) and its probe (`probe-encoder`)."""
