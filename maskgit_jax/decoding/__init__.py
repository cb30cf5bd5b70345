"""Parallel decoding: the decode loop, its options, logits and mask schedules (pure, traced)."""
