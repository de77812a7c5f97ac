"""Job submission: how the ranks of a run are started.

- `local.py` (`launcher=local`): this process, or `launcher.nproc_per_node` rank processes in its
  process group (its own launcher; see its docstring), or
  through torch's elastic agent (several nodes with `launcher.nnodes` + `launcher.rdzv_endpoint`).
- `slurm.py` (`launcher=slurm`): one SLURM job through submitit, checked against the cluster
  before it is queued; also the rendezvous every rank inside a SLURM step uses (slurm/train.sbatch
  and Hydra's submitit sweeps included), and the sizing of sweep points.
"""
