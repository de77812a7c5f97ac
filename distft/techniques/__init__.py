"""techniques (see README.md beside this file)."""
