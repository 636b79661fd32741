"""Benchmarks (``make bench``): each compares nowcast with its peer in the same run."""
