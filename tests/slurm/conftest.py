"""A real 2-node SLURM cluster for these tests: slurm/dev-cluster/up.sh starts it once per test
session (installing slurm-wlm and munge when missing) and down.sh removes it at the end. Each
node is a network namespace with its own hostname (n1, n2) and address; jobs run there for real.

Making namespaces and installing Debian packages needs root. CI runs as root and runs these
tests; a contributor's `make test` as another user reports them as not run, with the reason, in
pytest's summary (`sudo make test` runs them). Where CI is set (CI=true) not being root is an
error instead: CI never passes without them.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.distributed.helpers import REPO

CLUSTER_DIR = "/tmp/distft-dev-cluster"  # up.sh's default: one dev cluster per machine, tests included


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        reason = ("needs root: the SLURM dev cluster makes a network namespace per node and installs slurm-wlm "
                  "and munge; CI runs these tests as root (run `sudo make test` to run them here)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set but this is not root: {reason}", pytrace=False)
        pytest.skip(reason)
    env = {**os.environ, "DISTFT_DEVCLUSTER_DIR": CLUSTER_DIR}
    up = subprocess.run(["bash", os.path.join(REPO, "slurm", "dev-cluster", "up.sh"), "2"], capture_output=True,
                        text=True, env=env, timeout=600)
    assert up.returncode == 0 and "ready" in up.stdout, up.stdout[-3000:] + up.stderr[-3000:]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(CLUSTER_DIR, "slurm.conf")
    yield os.environ["SLURM_CONF"]
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    subprocess.run(["bash", os.path.join(REPO, "slurm", "dev-cluster", "down.sh")], capture_output=True, env=env,
                   timeout=120)
