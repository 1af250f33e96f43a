"""End to end through every launcher: each run prints its world size and exact norms, compared with float64.

torchrun (single node), two simulated nodes (two torchrun on localhost, c10d rendezvous), the SLURM
script with a stand-in ``srun``, ``mpirun`` with the mpi4py bootstrap, and ``distclip launch`` with
the multi-CPU and DeepSpeed Accelerate YAMLs. Every subprocess has a timeout and a free port.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.helpers.launching import (
    ROOT,
    accelerate_reference,
    char_lstm_reference,
    check_records,
    free_port,
    free_port_in,
    launch_env,
    records,
    run,
    yaml_section,
)

pytestmark = pytest.mark.multiprocess

# The DDP demo in float64: the launched run then matches the float64 reference to the fp32 rounding of the
# reported norms, so any launch error (wrong world, unsynchronised ranks, double counting) shows at once.
# (In float32 the LSTM's own backward differs from float64 by ~1e-6, which would hide nothing but blur the check.)
DEMO = ["launch/train_char_lstm.py", "--config", "configs/demo.yaml", "--steps", "2", "--text-bytes", "200000",
        "--dtype", "float64", "--json"]
DEMO_LR = 20.0  # the demo's default: step 2 is clipped
DEMO_RTOL = 1.2e-7  # two fp32 roundings
def needs_mpi(test):
    """Open MPI (mpirun) and mpi4py are CI prerequisites (.ci/run installs them): missing, the test fails."""
    return test


@pytest.fixture(scope="module")
def demo_reference():
    return char_lstm_reference(2, 2, yaml_section("configs/demo.yaml"), lr=DEMO_LR)


def assert_ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_torchrun_single_node(demo_reference):
    proc = run(["bash", "launch/torchrun.sh", *DEMO], launch_env(NPROC_PER_NODE="2"))
    found = records(assert_ok(proc))
    check_records(found, demo_reference, world=2, first_step=1, rtol=DEMO_RTOL)
    assert {r["backend"] for r in found} == {"gloo"}
    assert any(c < 1.0 for c in found[-1]["coefs"].values())  # step 2 is clipped: the reference checks that too


def test_torchrun_two_simulated_nodes(demo_reference):
    """Two torchrun on localhost, --nnodes 2, NODE_RANK 0 and 1, c10d rendezvous on a free port."""
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", "launch/torchrun_multinode.sh", *DEMO], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=launch_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                             MASTER_PORT=port, NPROC_PER_NODE="1", RDZV_TIMEOUT="120"))
             for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=300)
            outputs.append(assert_ok(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr)))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    per_node = [records(out) for out in outputs]
    assert [{r["local_rank"] for r in node} for node in per_node] == [{0}, {0}]  # one rank on each "node"
    assert {r["rank"] for r in per_node[0]} != {r["rank"] for r in per_node[1]}
    check_records(per_node[0] + per_node[1], demo_reference, world=2, first_step=1, rtol=DEMO_RTOL)


FAKE_SRUN = """\
#!/usr/bin/env bash
# Stand-in for srun: one task per node (SLURM_JOB_NUM_NODES), SLURM_NODEID/PROCID set as srun does.
echo "$@" > "$SRUN_LOG"
while [[ "${1:-}" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = """\
#!/usr/bin/env bash
# Stand-in for `scontrol show hostnames LIST`: one host per line.
[[ "$1 $2" == "show hostnames" ]] && tr ',' '\\n' <<< "$3"
"""


def test_slurm_script_with_stand_in_srun(tmp_path, demo_reference):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    port = free_port_in(29500, 30500)  # the script derives MASTER_PORT = 29500 + SLURM_JOB_ID % 1000
    env = launch_env(PATH=f"{bin_dir}:{launch_env()['PATH']}", SRUN_LOG=str(tmp_path / "srun.log"),
                     SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2",
                     SLURM_JOB_ID=str(7000 + port - 29500))
    proc = run(["bash", "launch/slurm.sbatch", *DEMO], env)
    out = assert_ok(proc)
    assert "--ntasks-per-node=1" in (tmp_path / "srun.log").read_text()
    assert {r["local_rank"] for r in records(out)} == {0}  # one torchrun per node, one rank each
    assert f"distclip: 2 nodes x 1 processes, rendezvous 127.0.0.1:{port} " in proc.stderr, proc.stderr
    check_records(records(out), demo_reference, world=2, first_step=1, rtol=DEMO_RTOL)


@needs_mpi
def test_mpirun_with_mpi4py_bootstrap(demo_reference):
    env = launch_env(NP="2", MPIRUN_ARGS="--allow-run-as-root --oversubscribe")
    proc = run(["bash", "launch/mpirun.sh", *DEMO], env)
    found = records(assert_ok(proc))
    assert {(r["rank"], r["local_rank"]) for r in found} == {(0, 0), (1, 1)}  # both on this node: shared-memory split
    check_records(found, demo_reference, world=2, first_step=1, rtol=DEMO_RTOL)


MPI_SCRIPT = """
import json, sys, torch, torch.distributed as dist
import distclip.mpi
env = distclip.mpi.init_process_group()
total = torch.ones(1)
dist.all_reduce(total)
sys.stdout.write("DISTCLIP " + json.dumps({**env.as_env(), "sum": total.item(), "world": dist.get_world_size()}) + "\\n")
dist.destroy_process_group()
"""


@needs_mpi
def test_mpi_init_process_group_in_a_script():
    cmd = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
           sys.executable, "-c", MPI_SCRIPT]
    found = records(assert_ok(run(cmd, launch_env(), timeout=120)))
    assert sorted((r["RANK"], r["LOCAL_RANK"], r["LOCAL_WORLD_SIZE"], r["world"], r["sum"]) for r in found) == [
        ("0", "0", "2", 2, 2.0), ("1", "1", "2", 2, 2.0)]
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in found}) == 1  # broadcast from rank 0


def accelerate_launch(config: str, steps: int, timeout: float = 300) -> list[dict]:
    cmd = [sys.executable, "-m", "distclip", "launch", "--config_file", config, "--main_process_port", str(free_port()),
           "launch/train_accelerate.py", "--steps", str(steps), "--json"]
    return records(assert_ok(run(cmd, launch_env(), timeout=timeout)))


@needs_mpi
def test_distclip_launch_multi_cpu_yaml():
    config = "configs/accelerate_multi_cpu.yaml"
    found = accelerate_launch(config, steps=3)
    assert {(r["num_processes"], r["distributed_type"], r["dtype"]) for r in found} == {(2, "MULTI_CPU", "torch.float32")}
    refs = accelerate_reference(2, 3, yaml_section(config, "distclip"))
    check_records(found, refs, world=2, norm_key="norm")
    assert any(c < 1.0 for r in found for c in r["coefs"].values()) and any(
        c == 1.0 for r in found for c in r["coefs"].values())  # per-group: some groups clipped, others not


@pytest.mark.parametrize("stage", [2])
def test_distclip_launch_deepspeed_yaml(stage):
    config = f"configs/accelerate_deepspeed_zero{stage}.yaml"
    found = accelerate_launch(config, steps=3, timeout=480)  # a fresh machine first builds DeepSpeed's shm op (~1 min)
    assert {(r["num_processes"], r["distributed_type"]) for r in found} == {(2, "DEEPSPEED")}
    refs = accelerate_reference(2, 3, yaml_section(config, "distclip"))
    check_records(found, refs, world=2, norm_key="norm")


def test_bad_distclip_section_fails_before_any_process_starts(tmp_path):
    marker = tmp_path / "started"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    combined = yaml_section("configs/accelerate_multi_cpu.yaml")
    combined["distclip"] = {**combined["distclip"], "nonfinit": "skip"}  # typo of nonfinite
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(combined))
    proc = run([sys.executable, "-m", "distclip", "launch", "--config_file", str(config), str(script)], launch_env(),
               timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nonfinit: unknown key" in proc.stderr and "did you mean 'nonfinite'" in proc.stderr, proc.stderr
    assert textwrap.shorten(str(config), 500) in proc.stderr
    assert not marker.exists()
