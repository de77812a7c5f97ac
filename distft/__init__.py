"""distft: fine-tune LLaMA-family models from one process to multi-node clusters.

`import distft` stays fast: heavy modules (torch, transformers, deepspeed) are imported by the
submodules that need them.
"""

__version__ = "0.1.0"
