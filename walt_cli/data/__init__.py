"""Data: video decoding and encoding, datasets, latent shards."""
