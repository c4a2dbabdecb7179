"""Training: state, optimizer factory, jitted steps, Orbax checkpoints and the epoch loop."""
