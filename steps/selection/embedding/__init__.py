"""The embedding pass: the base model's pre-logit statistics of every pool example, on disk."""
