"""Evaluation stage: held-out loss and perplexity."""
