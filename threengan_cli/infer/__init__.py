"""Using a trained model: the classify engines, the out-of-distribution score, evaluate,
generate."""
