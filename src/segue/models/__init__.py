"""Model components: the DiT denoiser, the causal video VAE and the text/image encoders."""
