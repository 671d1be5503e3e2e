"""Downstream training: optimisers, adversarial training, OOD fine-tuning and unlearning (one module per method)."""
