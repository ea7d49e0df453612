"""How fast fmerge starts: planning commands and a cached no-op run against `python -c "import torch"`.

Side by side in one run, each command N times round-robin (so a burst of load elsewhere hits all of
them alike), best and median wall time of the whole process:

  - `python -c pass` and `python -c "import torch"` (the floor every fmerge command pays),
  - `fmerge status`, a cached no-op `fmerge run`, `fmerge validate` on a tiny cached data-aware
    recipe (the one tests/test_start_fast.py uses: a Fisher, three merges, one exported, one swept,
    an eval writing results and a plot; built and run once in bench/work/startup/),
  - `fmerge ls` on its store,
  - `fmerge status recipes/demo.yaml` and its cached no-op run, if artifacts/ holds the demo's
    results (after `make demo`; skipped with a message otherwise),

with the CPU time (user + system) of each as well, which other jobs on the machine disturb less,
then one `python -X importtime` of `fmerge status` summed by top-level package. The issue's target
(14): a cached no-op run and `status` within `import torch` + 0.5 s. Prints a table and writes
bench/results/startup.json.

    .venv/bin/python bench/startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FMERGE = str(Path(PY).parent / "fmerge")
WORK = ROOT / "bench" / "work" / "startup"
TARGET_S = 0.5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
# As installed: pip byte-compiles a package, an editable checkout caches its .pyc files on first
# import. With PYTHONDONTWRITEBYTECODE set, every start compiles fmerge's ~50 modules again (about
# 0.1 s), so by default the bench caches bytecode under bench/work/pycache (nothing is written
# into the source tree); --no-bytecode-cache measures the environment as it is.
PYCACHE = ROOT / "bench" / "work" / "pycache"


def tiny_project() -> Path:
    """The tiny recipe, built and run once (its artifacts and hash caches then serve every rerun)."""
    recipe = WORK / "recipe.yaml"
    if not recipe.is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from test_start_fast import build_project

        WORK.parent.mkdir(parents=True, exist_ok=True)
        if WORK.exists():
            import shutil

            shutil.rmtree(WORK)
        build_project(WORK)
    proc = subprocess.run([FMERGE, "run", "recipe.yaml"], cwd=WORK, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the tiny recipe failed to run:\n{proc.stdout}\n{proc.stderr}")
    check(WORK, "recipe.yaml")
    return recipe


def check(cwd: Path, recipe: str) -> bool:
    """Whether every step of `recipe` is cached (`fmerge status --check`)."""
    return subprocess.run([FMERGE, "status", recipe, "--check"], cwd=cwd, env=ENV,
                          capture_output=True).returncode == 0


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall s, CPU s: user + system) of one run of `cmd`; CPU time suffers less from other jobs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    if cmd[1:2] == ["run"] and "computed" in proc.stdout:
        sys.exit(f"{' '.join(cmd)} computed something: not a no-op run\n{proc.stdout}")
    return seconds, cpu


def import_profile(cwd: Path) -> dict[str, float]:
    """Seconds of imports of `fmerge status` by top-level package (python -X importtime)."""
    proc = subprocess.run([PY, "-X", "importtime", FMERGE, "status", "recipe.yaml"], cwd=cwd, env=ENV,
                          capture_output=True, text=True)
    by_package: dict[str, float] = defaultdict(float)
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, self_us, _, name = _fields(line)
        by_package[name.split(".")[0]] += self_us / 1e6
    return dict(sorted(by_package.items(), key=lambda kv: -kv[1]))


def _fields(line: str) -> tuple[str, float, float, str]:
    """(prefix, self µs, cumulative µs, module) of one `-X importtime` line."""
    head, self_us, cumulative, name = ("",) + tuple(line.replace("import time:", "").split("|"))
    return head, float(self_us), float(cumulative), name.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="keep PYTHONDONTWRITEBYTECODE as the environment sets it (sources compiled at every start)")
    args = ap.parse_args()
    if not args.no_bytecode_cache:
        ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        ENV["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    bytecode = ("cached (PYTHONPYCACHEPREFIX=bench/work/pycache)" if not args.no_bytecode_cache else
                f"PYTHONDONTWRITEBYTECODE={ENV.get('PYTHONDONTWRITEBYTECODE', '')!r}")

    tiny_project()
    commands: dict[str, tuple[list[str], Path]] = {
        "python -c pass": ([PY, "-c", "pass"], WORK),
        "python -c 'import torch'": ([PY, "-c", "import torch"], WORK),
        "fmerge status (tiny)": ([FMERGE, "status", "recipe.yaml"], WORK),
        "fmerge run, cached no-op (tiny)": ([FMERGE, "run", "recipe.yaml"], WORK),
        "fmerge validate (tiny)": ([FMERGE, "validate", "recipe.yaml"], WORK),
        "fmerge ls (tiny store)": ([FMERGE, "ls", "--store", "store"], WORK),
    }
    demo_note = None
    if (ROOT / "artifacts" / "objects").is_dir() and check(ROOT, "recipes/demo.yaml"):
        commands["fmerge status recipes/demo.yaml"] = ([FMERGE, "status", "recipes/demo.yaml"], ROOT)
        commands["fmerge run recipes/demo.yaml, cached no-op"] = ([FMERGE, "run", "recipes/demo.yaml"], ROOT)
    else:
        demo_note = "skipped recipes/demo.yaml: artifacts/ does not hold all its results (run `make demo` first)"
        print(demo_note)

    times: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for name, (cmd, cwd) in commands.items():  # one warm-up each: page cache, .pyc files
        timed(cmd, cwd)
    for _ in range(args.repeat):
        for name, (cmd, cwd) in commands.items():
            wall, cpu = timed(cmd, cwd)
            times[name].append(wall)
            cpus[name].append(cpu)

    torch_best = min(times["python -c 'import torch'"])
    torch_cpu = min(cpus["python -c 'import torch'"])
    rows = []
    print(f"\nbest and median of {args.repeat} (wall s, whole process; bytecode {bytecode}); target: status "
          f"and a cached run <= import torch + {TARGET_S} s = {torch_best + TARGET_S:.2f} s")
    print(f"{'command':48} {'best':>6} {'median':>7} {'- torch':>8}  {'CPU best':>8} {'- torch':>8}  target")
    for name, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        targeted = name.startswith(("fmerge status", "fmerge run"))
        met = best <= torch_best + TARGET_S if targeted else None
        rows.append({"command": name, "argv": commands[name][0], "best_s": round(best, 3),
                     "median_s": round(median, 3), "over_torch_s": round(best - torch_best, 3),
                     "all_s": [round(t, 3) for t in ts], "cpu_best_s": round(min(cpus[name]), 3),
                     "cpu_over_torch_s": round(min(cpus[name]) - torch_cpu, 3), "target_met": met})
        print(f"{name:48} {best:6.2f} {median:7.2f} {best - torch_best:+8.2f}  {min(cpus[name]):8.2f} "
              f"{min(cpus[name]) - torch_cpu:+8.2f}  {'' if met is None else ('met' if met else 'NOT met')}")

    imports = import_profile(WORK)
    total = sum(imports.values())
    print(f"\nimports of `fmerge status` (one -X importtime run, {total:.2f} s in all), by package:")
    for pkg, s in list(imports.items())[:12]:
        print(f"  {pkg:24} {s:6.3f} s")

    out = ROOT / "bench" / "results" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "repeat": args.repeat, "bytecode": bytecode, "target": f"status and cached run <= import torch + {TARGET_S} s",
        "rows": rows, "demo": demo_note or "measured",
        "status_imports_s": {k: round(v, 4) for k, v in imports.items()},
    }, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
