"""CLI command modules. Each is imported by `walt_cli.cli` at start-up, so module level code here
must stay cheap: import torch and friends inside the command functions."""
