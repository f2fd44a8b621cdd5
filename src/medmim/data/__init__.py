"""Data stage: image I/O with geometry, dataset formats, checks, synthetic phantoms."""
