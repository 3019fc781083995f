"""benchmarks/pin_cores.py: a command on N distinct physical cores (the harness that measures a 2-core CPU on a
bigger host)."""
import subprocess
import sys

from benchmark_scripts import BENCHMARKS, load


def _topology(root, siblings: dict[int, str], packages: dict[int, int]):
    for cpu, sib in siblings.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(sib + "\n")
        (topo / "physical_package_id").write_text(f"{packages.get(cpu, 0)}\n")


def test_one_cpu_per_physical_core_first_socket_first(tmp_path):
    mod = load("pin_cores")
    # 2 sockets x 2 cores x 2 hyperthreads, numbered as Linux often does: siblings 8 apart.
    sib = {0: "0,8", 8: "0,8", 1: "1,9", 9: "1,9", 4: "4,12", 12: "4,12", 5: "5-5,13", 13: "5,13"}
    _topology(tmp_path, sib, {4: 1, 12: 1, 5: 1, 13: 1})
    assert mod.physical_cores(set(sib), tmp_path) == [0, 1, 4, 5]
    assert mod.physical_cores({8, 9, 12}, tmp_path) == [8, 9, 12]   # an allowed sibling stands for its core
    assert mod.physical_cores({3}, tmp_path) == [3]                 # no topology files: a core of its own
    assert mod._parse_list("0-2,7,9-10") == [0, 1, 2, 7, 9, 10]


def test_the_command_runs_on_the_cores_it_asked_for():
    script = str(BENCHMARKS / "pin_cores.py")
    p = subprocess.run([sys.executable, script, "--cores", "1", "--", sys.executable, "-c",
                        "import os; print(len(os.sched_getaffinity(0)))"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "1" and "running on CPUs" in p.stderr
    p = subprocess.run([sys.executable, script, "--cores", "4096", "--", "true"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "fewer than --cores 4096" in p.stderr
    p = subprocess.run([sys.executable, script, "--cores", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "after --" in p.stderr
    p = subprocess.run([sys.executable, script, "--cores", "1", "--", sys.executable, "-c", "raise SystemExit(3)"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
