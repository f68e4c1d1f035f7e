"""Diffusion maths: schedules, losses, samplers. Pure functions that take the network as an argument."""
