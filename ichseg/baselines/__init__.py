"""Non-learned baselines scored by the same evaluation as the networks (numpy only)."""
