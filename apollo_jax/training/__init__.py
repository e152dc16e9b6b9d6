"""Training: the step, the loop, optimizer, loss, checkpoints, initialisation, metrics, memory plan."""
