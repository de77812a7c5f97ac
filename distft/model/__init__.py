"""model (see README.md beside this file)."""
