"""Models: frozen encoders (global tokens), autoencoders, UNet presets, condition projection."""
