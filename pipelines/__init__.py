"""The KFP v2 pipeline(s) of step3vl, each next to its compiled YAML (see README.md)."""
