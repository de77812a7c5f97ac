"""Techniques: what gets trained (full, LoRA, QLoRA, DoRA, prefix, prompt). `kinds.py` is the torch-free
table every other module reads; `build.py` builds the trainable model. README.md here: names and flow."""
