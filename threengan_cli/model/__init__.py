"""The model: networks, losses, methods, pseudo-labels, weight averaging and the model file."""
