"""KFP v2 components, one per stage: typed wrappers that map artifacts to paths (see README.md)."""
