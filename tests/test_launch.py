"""Scale-out with real processes: the launch scripts on two hosts with their own addresses
(network namespaces), and a real Slurm cluster with two slurmd "nodes" running slurm.sbatch."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, child_env, fresh_run_dir, tiny_overrides
from sabiscale.train.engine import free_port

# a Slurm cluster, network namespaces, a clone of the README: `make test`, not `make check`
pytestmark = pytest.mark.system

STEPS = 4


def _overrides(out: Path) -> list[str]:
    return tiny_overrides(out) + [f"train.max_steps={STEPS}", "optim.warmup_steps=1", "train.eval_batches=1",
                                  "train.trace_samples=true", "tracking.system_metrics=false"]


def _assert_trained_on_two_ranks(out: Path) -> None:
    """Both ranks trained every step, on disjoint samples, and the checkpoint knows it was 2 ranks."""
    meta = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "sabiscale.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == STEPS
    keys = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in (out / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        keys[rank] = {k for r in records for _, batch in r["batches"] for k in batch}
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture
def two_hosts():
    """node_a (10.77.0.1) and node_b (10.77.0.2), joined by a veth pair and nothing else."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    suffix = str(os.getpid())[-5:]
    ns = (f"sabi_a{suffix}", f"sabi_b{suffix}")
    veth = (f"sva{suffix}", f"svb{suffix}")
    setup = [["ip", "netns", "add", ns[0]], ["ip", "netns", "add", ns[1]],
             ["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]],
             ["ip", "link", "set", veth[0], "netns", ns[0]], ["ip", "link", "set", veth[1], "netns", ns[1]],
             ["ip", "-n", ns[0], "addr", "add", "10.77.0.1/24", "dev", veth[0]],
             ["ip", "-n", ns[1], "addr", "add", "10.77.0.2/24", "dev", veth[1]]]
    for n, v in zip(ns, veth):
        setup += [["ip", "-n", n, "link", "set", "lo", "up"], ["ip", "-n", n, "link", "set", v, "up"]]
    for cmd in setup:
        done = _run(cmd)
        if done.returncode != 0:
            for n in ns:
                _run(["ip", "netns", "del", n])
            pytest.skip(f"cannot create network namespaces here ({' '.join(cmd)}: {done.stderr.strip()})")
    yield ns, veth
    for n in ns:
        for pid in _run(["ip", "netns", "pids", n]).stdout.split():
            _run(["kill", "-9", pid])
        _run(["ip", "netns", "del", n])


def test_two_hosts_one_launcher_each(demo_cfg, two_hosts, tmp_path):
    """launch/node.sh on each of two hosts with their own addresses: one per-node DeepSpeed
    launcher each, rendezvous at node 0's address over the veth link only."""
    (ns_a, ns_b), (veth_a, veth_b) = two_hosts
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    procs = []
    for rank, (ns, ifname) in enumerate(((ns_a, veth_a), (ns_b, veth_b))):
        env = child_env({"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "10.77.0.1", "MASTER_PORT": "29765",
                         "GPUS_PER_NODE": "1", "GLOO_SOCKET_IFNAME": ifname, "SABISCALE_PYTHON": sys.executable})
        procs.append(subprocess.Popen(["timeout", "600", "ip", "netns", "exec", ns, str(ROOT / "launch/node.sh"),
                                       str(ROOT / "launch/recipes/demo.yaml"), *_overrides(out)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate()[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank} failed:\n{log[-4000:]}"
    assert "sabiscale node 0/2" in logs[0] and "sabiscale node 1/2" in logs[1]
    assert "master 10.77.0.1:29765" in logs[1]
    _assert_trained_on_two_ranks(out)


SLURM_CONF = """ClusterName=sabitest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
# job credentials live 10 s instead of 120: a requeued job may start again that much sooner
AuthInfo=cred_expire=10
ReturnToService=2
MinJobAge=300
KillWait=5
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=1 RealMemory=9000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=1 RealMemory=9000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm(tmp_path):
    """A real Slurm cluster on this host: slurmctld and two slurmd "nodes" (n1, n2), munge auth."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None
               and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing); `make test` installs slurm-wlm and "
                    "munge from Debian when run as root with apt")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    d = tmp_path / "slurm"
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir(parents=True)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, d=d, ctld_port=free_port(), port1=free_port(), port2=free_port()))
    env = {**child_env(), "SLURM_CONF": str(conf)}  # without this process's rendezvous (MASTER_PORT)
    started_munge = False
    if _run(["pgrep", "-x", "munged"]).returncode != 0:
        _run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"])
        done = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        assert done.returncode == 0, f"munged did not start: {done.stderr}"
        started_munge = True
    for cmd in (["/usr/sbin/slurmctld", "-f", str(conf)], ["/usr/sbin/slurmd", "-f", str(conf), "-N", "n1"],
                ["/usr/sbin/slurmd", "-f", str(conf), "-N", "n2"]):
        done = _run(cmd, env=env)
        assert done.returncode == 0, f"{cmd[0]} did not start: {done.stderr}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env).stdout.split()
        if states.count("idle") == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the two slurmd nodes did not become idle: {states}\n{(d / 'log' / 'slurmctld.log').read_text()[-2000:]}")
    yield env, d
    _run(["scontrol", "shutdown"], env=env)
    if started_munge:
        _run(["/usr/sbin/munged", "--stop"])


def _wait_for_job(job: str, env: dict, d: Path, timeout: float = 600) -> tuple[str, str]:
    """(final JobState, the job's output) once the job has ended."""
    deadline, state = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        shown = _run(["scontrol", "show", "job", job], env=env).stdout
        state = next((f.split("=", 1)[1] for f in shown.split() if f.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(2)
    log = (d / f"job-{job}.out").read_text() if (d / f"job-{job}.out").exists() else "(no job output)"
    return state, log


def test_sbatch_trains_on_two_slurm_nodes(demo_cfg, slurm, tmp_path):
    env, d = slurm
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    job_env = {**child_env(env), "SABISCALE_PYTHON": sys.executable}
    submitted = _run(["sbatch", "--parsable", f"--output={d}/job-%j.out", "launch/slurm.sbatch",
                      str(ROOT / "launch/recipes/demo.yaml"), *_overrides(out)], cwd=ROOT, env=job_env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    state, log = _wait_for_job(job, env, d)
    assert state == "COMPLETED", f"job {job} ended {state or 'not in time'}:\n{log[-4000:]}"
    assert "nodes n[1-2]" in log and "master 127.0.0.1:" in log
    assert "sabiscale node 0/2 on n1" in log and "sabiscale node 1/2 on n2" in log
    _assert_trained_on_two_ranks(out)


def test_plain_srun_starts_one_world_of_two_ranks(demo_cfg, slurm, tmp_path):
    """`srun -n 2 sabiscale train` without node.sh: rank and world size come from Slurm, the master
    from the first node of the job; not two worlds of one rank."""
    env, d = slurm
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    command = " ".join([sys.executable, "-m", "sabiscale", "train", str(ROOT / "launch/recipes/demo.yaml"), *_overrides(out)])
    submitted = _run(["sbatch", "--parsable", "--nodes=2", "--ntasks=2", f"--output={d}/job-%j.out",
                      f"--wrap=srun {command}"], cwd=ROOT, env=child_env(env))
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    state, log = _wait_for_job(job, env, d)
    assert state == "COMPLETED", f"job {job} ended {state or 'not in time'}:\n{log[-4000:]}"
    _assert_trained_on_two_ranks(out)


def test_slurm_tasks_map_to_ranks_and_keep_their_gpus():
    from sabiscale.train.engine import slurm_rendezvous

    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "4242",
           "MASTER_ADDR": "10.0.0.1", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert slurm_rendezvous(env) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.1",
                                     "MASTER_PORT": str(20000 + 4242 % 20000)}
    bound = slurm_rendezvous({**env, "CUDA_VISIBLE_DEVICES": "3"})  # --gpus-per-task=1: its one GPU is cuda:0
    assert bound["LOCAL_RANK"] == "0"


def test_node_launcher_keeps_the_gpus_slurm_gave_the_job():
    import base64

    env = {**os.environ, "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "CUDA_VISIBLE_DEVICES": "5,7",
           "SABISCALE_DRY_RUN": "1"}
    env.pop("GPUS_PER_NODE", None)
    out = _run([str(ROOT / "launch" / "node.sh"), "recipe.yaml"], env=env)
    assert out.returncode == 0, out.stderr
    info = next(line.split("=", 1)[1] for line in out.stdout.splitlines() if line.startswith("world_info="))
    assert json.loads(base64.urlsafe_b64decode(info)) == {"node0": [5, 7]}
    assert "2 rank(s) (devices 5,7)" in out.stdout
    threads = max(1, len(os.sched_getaffinity(0)) // 2) if "OMP_NUM_THREADS" not in os.environ else int(os.environ["OMP_NUM_THREADS"])
    assert f"{threads} thread(s) per rank" in out.stdout  # the node's cores shared by its 2 ranks


def test_submit_derives_cores_and_memory_from_the_profile():
    env = {**os.environ, "SUBMIT_DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "4",
           "SABISCALE_BIN": str(Path(sys.executable).parent / "sabiscale")}
    offload = _run([str(ROOT / "launch" / "submit.sh"), str(ROOT / "launch/recipes/demo.yaml")], env=env)
    assert offload.returncode == 0, offload.stderr
    flags = dict(f.lstrip("-").split("=") for f in offload.stdout.split() if f.startswith("--"))
    assert flags["nodes"] == "2" and flags["gpus-per-node"] == "4"
    assert int(flags["cpus-per-task"]) >= 4 * 2 and int(flags["mem"].rstrip("G")) >= 4 * 4
    assert offload.stdout.split()[0] == "sbatch" and "slurm.sbatch" in offload.stdout


def _mlflow_losses(out: Path) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def test_a_signalled_slurm_job_checkpoints_requeues_and_ends_as_if_uninterrupted(demo_cfg, slurm, tmp_path):
    """Slurm's USR1 (as `--signal=USR1@120` sends before the time limit): every rank finishes its
    step and saves, the job requeues itself, comes back, resumes and ends with the uninterrupted
    run's losses."""
    env, d = slurm
    steps = 40
    extra = [f"train.max_steps={steps}", "train.checkpoint_every=1000", "train.log_every=1"]
    reference = fresh_run_dir(demo_cfg, tmp_path / "reference")
    done = _run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29787",
                 "--module", "sabiscale", "train", str(ROOT / "launch/recipes/demo.yaml"), *_overrides(reference),
                 *extra], cwd=ROOT, env=child_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    job_env = {**child_env(env), "SABISCALE_PYTHON": sys.executable}
    submitted = _run(["sbatch", "--parsable", f"--output={d}/job-%j.out", "--open-mode=append", "launch/slurm.sbatch",
                      str(ROOT / "launch/recipes/demo.yaml"), *_overrides(out), *extra], cwd=ROOT, env=job_env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    trace = out / "trace" / "rank0.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not trace.is_file() or len(trace.read_text().splitlines()) < 5):
        time.sleep(0.2)
    assert _run(["scancel", "--signal=USR1", job], env=env).returncode == 0
    state, log = _wait_for_job(job, env, d)
    assert state == "COMPLETED", f"job {job} ended {state or 'not in time'}:\n{log[-4000:]}"
    assert "stopped by a signal with a checkpoint saved; requeueing" in log
    shown = _run(["scontrol", "show", "job", job], env=env).stdout
    assert "Restarts=1" in shown
    losses, expected = _mlflow_losses(out), _mlflow_losses(reference)
    assert sorted(losses) == list(range(1, steps + 1))
    assert [losses[s] for s in range(1, steps + 1)] == pytest.approx([expected[s] for s in range(1, steps + 1)],
                                                                      rel=1e-5, abs=1e-6)
