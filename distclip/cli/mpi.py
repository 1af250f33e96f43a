"""Bootstrap torch.distributed from MPI, for clusters that launch with ``mpirun``/``srun --mpi``.

As a launcher wrapper, for any script written for torchrun (``init_process_group()`` from the
environment), unchanged::

    mpirun -np 8 python -m distclip.mpi train.py --args     # see launch/mpirun.sh

or in a script: ``distclip.mpi.init_process_group()``.

From ``MPI.COMM_WORLD`` it takes the rank and world size; the local rank and local world size
from a shared-memory split (``COMM_TYPE_SHARED``: the ranks on the same node); the master
address (rank 0's host name, unless ``MASTER_ADDR`` is set) and a free port on it (unless
``MASTER_PORT`` is set) are broadcast from rank 0. It exports RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun would, then torch initialises gloo
(CPU) or NCCL (GPU) over TCP: the torch wheels have no MPI backend, and none is needed. mpi4py
is imported only here.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

from ..core.errors import require_extra
from ..errors import MissingExtraError
from .output import fail

__all__ = ["MPIEnvironment", "discover", "export", "init_process_group", "main"]

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class MPIEnvironment:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def as_env(self) -> dict[str, str]:
        values = (self.rank, self.world_size, self.local_rank, self.local_world_size, self.master_addr,
                  self.master_port)
        return {key: str(value) for key, value in zip(ENV_KEYS, values)}


def discover(comm=None) -> MPIEnvironment:
    """Rank, sizes and rendezvous address from MPI (collective over ``comm``: call on every rank)."""
    MPI = require_extra("mpi4py.MPI", "mpi", "distclip.mpi (it also needs an MPI, e.g. Open MPI)")
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = local.Get_rank(), local.Get_size()
    local.Free()
    master = None
    if rank == 0:
        master = (os.environ.get("MASTER_ADDR") or socket.gethostname(),
                  int(os.environ.get("MASTER_PORT") or _free_port()))
    master_addr, master_port = comm.bcast(master, root=0)
    return MPIEnvironment(rank, world, local_rank, local_world, master_addr, master_port)


def export(comm=None) -> MPIEnvironment:
    """:func:`discover`, then set the torchrun environment variables in ``os.environ``."""
    environment = discover(comm)
    os.environ.update(environment.as_env())
    return environment


def init_process_group(backend: str | None = None, timeout: timedelta | None = None, comm=None) -> MPIEnvironment:
    """Export the environment from MPI and initialise the default process group (gloo on CPU, NCCL on GPU)."""
    import torch
    import torch.distributed as dist

    environment = export(comm)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(environment.local_rank % torch.cuda.device_count())
    if timeout is None:
        dist.init_process_group(backend, rank=environment.rank, world_size=environment.world_size)
    else:
        dist.init_process_group(backend, rank=environment.rank, world_size=environment.world_size, timeout=timeout)
    return environment


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None, prog: str = "python -m distclip.mpi") -> int:
    """``python -m distclip.mpi script.py [args]`` (or ``-m module [args]``): run it with the torchrun environment."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: mpirun -np N {prog} (script.py | -m module) [args]"
    if argv and argv[0] in ("-h", "--help"):
        print(f"{usage}\n\n" + __doc__.split("\n\n")[0] + "\n\nNeeds mpi4py and an MPI: pip install 'distclip[mpi]'.")
        return 0
    if not argv or argv == ["-m"]:
        print(usage, file=sys.stderr)
        return fail("mpi", f"error: a script or -m module is required ({prog} --help)")
    try:
        export()
    except MissingExtraError as err:
        return fail("mpi", err)
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
