"""Training: the loop, each stage's trainer, losses, masking, optimizers, FLOP counts."""
