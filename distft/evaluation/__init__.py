"""evaluation (see README.md beside this file)."""
