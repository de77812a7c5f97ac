"""The data path: load, clean, template, tokenize, split, augment and cache a run's rows, then pack
them into each rank's deterministic, resumable micro-batches (`python -m distft.data` prepares them
ahead of a job). README.md here: its modules, public names and data flow."""
