"""checkpoint (see README.md beside this file)."""
