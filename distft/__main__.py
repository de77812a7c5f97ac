"""`python -m distft [overrides]`: the command line, distft/commands/train.py."""

if __name__ == "__main__":
    from distft import preemption

    preemption.install()  # first thing: a stop signal or Ctrl-C while the rest imports is handled
    from distft.commands import exit_now
    from distft.commands.train import main

    exit_now(main())
