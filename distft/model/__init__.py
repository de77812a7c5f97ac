"""The base model and its tokenizer (built from a preset or loaded from a path, GGUF included), the
tokenizer-vs-embedding check, and the chunked loss every engine and evaluation computes.
README.md here: its modules, public names and data flow."""
