"""Job submission. Today every run executes in the calling process (`launcher=local` with one
process per node); multi-process local launches and SLURM, both through submitit, land here next.
"""
