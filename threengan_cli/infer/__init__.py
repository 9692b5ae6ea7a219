"""Using a trained classifier: heatmaps, the batch report page and ONNX export."""
