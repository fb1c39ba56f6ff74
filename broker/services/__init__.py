"""Service modules: the broker's work, one resource each. Routes stay thin and call these."""
