"""Training: the optimizer and loss scaling, the train step, data, checkpoints and the loop."""
