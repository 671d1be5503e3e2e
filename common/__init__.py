"""The bottom layer: small helpers every package may use (no torch, no project imports)."""
