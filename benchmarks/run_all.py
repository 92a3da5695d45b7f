"""Runs every benchmark (P1-P16) in turn and prints each one's last line, the figure it exists for.

python benchmarks/run_all.py        # `make bench`; about an hour on 2 cores (P6 and P8 take most of it)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = [
    "p1_cache_speedup.py",
    "p2_extract_overhead.py",
    "p2_profile.py",
    "p3_loader.py",
    "p4_score.py",
    "p5_storage.py",
    "p6_report_time.py",
    "p7_block_kd_cost.py",
    "p8_augment.py",
    "p9_view_reads.py",
    "p10_object_store.py",
    "p11_processes.py",
    "p12_amp.py",
    "p13_loading.py",
    "p14_two_pass.py",
    "p15_real_size.py",  # needs the Fashion-MNIST study's store (`make fashion`); says so when it is absent
    "p16_cli_start.py",
]


def main() -> None:
    here = Path(__file__).parent
    results = []
    for script in SCRIPTS:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, script], cwd=here, capture_output=True, text=True)
        print(run.stdout, end="", flush=True)
        if run.returncode:
            print(run.stderr[-2000:], file=sys.stderr)
        last = run.stdout.strip().splitlines()[-1] if run.returncode == 0 else f"FAILED ({run.returncode})"
        results.append(f"{script:24s} {time.perf_counter() - start:6.0f} s  {last}")
    print("\n".join(["", "summary:"] + results))
    sys.exit(any("FAILED" in r for r in results))


if __name__ == "__main__":
    main()
