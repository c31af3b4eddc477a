"""Core of the user-level gradient inversion tool: scenario, label inference, objectives, prior, metrics, I/O."""
