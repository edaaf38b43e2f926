"""One ``run(cfg, ...) -> outputs`` per stage: the single contract the CLI, tests and KFP components call."""
