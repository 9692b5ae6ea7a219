"""Data in: scanning sources, decoding images, preparing datasets, loading what a run trains on."""
