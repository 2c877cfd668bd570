"""Training stage: fine-tune the base model on the picks (transformers Trainer, accelerate)."""
