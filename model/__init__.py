"""RETRO and its baseline (PyTorch): training from a built DB, evaluation in bits per byte, generation with
retrieval."""
