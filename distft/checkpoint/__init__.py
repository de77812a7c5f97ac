"""Checkpoints: the atomic save, verification before any load, the run directory's resume policy, the
`Checkpointer` the trainer uses, and export to Hugging Face format. README.md here: the layout and flow."""
