"""Run the CPU benchmarks one after another; write bench/results/*.json and a markdown summary for the README.

    python bench/run_all.py            # real shapes: ~10-12 minutes on 2 CPU cores
    python bench/run_all.py --quick    # fewer rounds and shorter sequences: ~3 minutes, for a look, not for the README
    python bench/run_all.py --gpu      # also bench/gpu_train.py (needs a CUDA GPU; ~5-10 minutes on an H100)

Each benchmark runs in its own process (so torch thread settings and memory do not carry over) with
`--json bench/results/<name>.json`; bench/results/summary.md then holds every table, the command line, the time each
took and the machine (runs.json keeps the list, so `--only NAME` reruns one and the summary keeps the others). The
cheap ones run first.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run_all.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, environment

BENCH = Path(__file__).resolve().parent
# name -> (arguments, arguments with --quick)
CPU_BENCHMARKS = {
    "padding": ([], []),
    "clip_crops": ([], ["--timed_crops", "1"]),
    "processor_throughput": ([], ["--images", "4"]),
    "lm_head_loss": ([], ["--repeats", "1", "--positions", "1024"]),
    "decoder_layer": ([], ["--repeats", "1", "--tokens", "512"]),
    "generation": ([], ["--batch_sizes", "1", "--new_tokens", "8", "--repeats", "1"]),
    "validation_cache": ([], ["--images", "200", "--rounds", "1"]),
}
GPU_BENCHMARKS = {"gpu_train": ([], ["--steps", "2", "--checkpointing", "on"])}


def relative(path: Path) -> str:
    """`path` relative to the repository root where it is inside it (for commands one can paste), else absolute."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_benchmark(name: str, extra: list[str], out_dir: Path) -> dict:
    """Run bench/<name>.py with --json from the repository root; its output streams through.
    Returns {name, command, seconds, ok}."""
    command = ["python", relative(BENCH / f"{name}.py"), *extra, "--json", relative(out_dir / f"{name}.json")]
    print(f"\n=== {name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command[1:]], cwd=REPO)
    seconds = time.perf_counter() - start
    print(f"=== {name}: {'done' if done.returncode == 0 else 'FAILED'} in {seconds:,.0f} s", flush=True)
    return {"name": name, "command": shlex.join(command), "seconds": seconds, "ok": done.returncode == 0}


def record(out_dir: Path, runs: list[dict]) -> list[dict]:
    """Merge `runs` into out_dir/runs.json (by benchmark name, so `--only x` updates x alone); all runs, in order."""
    path = out_dir / "runs.json"
    known = {run["name"]: run for run in (json.loads(path.read_text()) if path.is_file() else [])}
    known.update({run["name"]: run for run in runs})
    order = [*CPU_BENCHMARKS, *GPU_BENCHMARKS]
    merged = sorted(known.values(), key=lambda run: order.index(run["name"]) if run["name"] in order else len(order))
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def summary(runs: list[dict], out_dir: Path) -> str:
    """Markdown: the machine, then each benchmark's tables (read back from its JSON) with how and when it ran."""
    results = {run["name"]: json.loads((out_dir / f"{run['name']}.json").read_text())
               for run in runs if run["ok"] and (out_dir / f"{run['name']}.json").is_file()}
    env = next(iter(results.values()))["environment"] if results else environment()
    lines = [
        "# Benchmarks",
        "",
        f"Made with `python bench/run_all.py` on {env['platform']}, {env['cpu_count']} CPU cores "
        f"({env['torch_threads']} torch threads), torch {env['torch']}, transformers {env['transformers']}"
        + (f", {env['gpu']}" if "gpu" in env else "") + ". Each ratio is measured within one run, the variants "
        "alternating; each section gives the command that made it, how long it took and when.",
    ]
    for run in runs:
        result = results.get(run["name"])
        when = f", {result['environment']['date']}" if result else ""
        lines += ["", f"## {run['name']}", "", f"`{run['command']}` ({run['seconds']:,.0f} s{when})", ""]
        lines.append(result["markdown"] if result else "**failed** (see its output)")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter sequences (not for the README)")
    parser.add_argument("--gpu", action="store_true", help="also run gpu_train.py (CUDA)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these benchmarks (the summary keeps the "
                        "earlier results of the others)")
    parser.add_argument("--summary_only", action="store_true", help="rewrite summary.md from the last results")
    parser.add_argument("--out_dir", type=Path, default=BENCH / "results")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)

    benchmarks = {**CPU_BENCHMARKS, **(GPU_BENCHMARKS if args.gpu else {})}
    if args.only:
        unknown = set(args.only) - set(CPU_BENCHMARKS) - set(GPU_BENCHMARKS)
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {[*CPU_BENCHMARKS, *GPU_BENCHMARKS]}")
        benchmarks = {name: {**CPU_BENCHMARKS, **GPU_BENCHMARKS}[name] for name in args.only}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = [] if args.summary_only else [run_benchmark(name, quick if args.quick else full, args.out_dir)
                                         for name, (full, quick) in benchmarks.items()]
    merged = record(args.out_dir, runs)
    (args.out_dir / "summary.md").write_text(summary(merged, args.out_dir))
    print(f"\nwrote {args.out_dir / 'summary.md'}" + (f"; this run took {sum(r['seconds'] for r in runs) / 60:,.1f} "
                                                      "minutes" if runs else ""))
    if not all(run["ok"] for run in runs):
        sys.exit(1)
    return merged


if __name__ == "__main__":
    main()
