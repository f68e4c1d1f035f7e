"""Networks (nn.Modules only). Nothing here imports `walt_cli.diffusion`."""
