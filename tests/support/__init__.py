"""Helpers shared by every test area (and by benchmarks/): processes, images, namespaces, fakes."""
