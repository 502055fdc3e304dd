"""DiNO-Diffusion: latent diffusion conditioned on frozen DINO global tokens."""

__version__ = "0.1.0"
