"""The secure computation: plan format and export, ring arithmetic, dealer correlations, the fast engine, its channels and the party entry points."""
