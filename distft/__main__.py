"""`python -m distft [overrides]`: the command line, distft/cli.py."""

from distft.cli import run_command_line

if __name__ == "__main__":
    run_command_line()
