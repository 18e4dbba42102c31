"""Training loops (library side): plain typed arguments in, checkpoints out."""
