"""Training: rectified-flow DiT training, VAE training, EMA, resumable checkpoints, data/FSDP parallel."""
