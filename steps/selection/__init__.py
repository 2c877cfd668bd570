"""Selection stage: embed the pool, then pick a training subset (FisherSFT and baselines)."""
