"""Inference: the backend port, the two runtimes behind it, and the scheduler in front."""
