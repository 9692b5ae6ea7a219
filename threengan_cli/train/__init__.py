"""Training: the run folder, the loop, where it computes, scoring during training, its events."""
