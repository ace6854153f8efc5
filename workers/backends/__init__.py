"""Device contexts a worker can own: torch (CPU, CUDA) today, ttnn for Tenstorrent chips."""
