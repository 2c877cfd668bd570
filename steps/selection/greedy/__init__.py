"""Greedy FisherSFT: the design matrix (numpy and torch), its screening and the greedy search."""
