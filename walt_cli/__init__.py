"""walt: a PyTorch toolkit for W.A.L.T (Gupta et al., 2023), window-attention latent video diffusion."""

__version__ = "0.1.0.dev0"
