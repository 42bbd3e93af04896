"""Run every benchmarks/bench_*.py in turn (each prints its own table with ratios)."""
import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
failed = []
for script in sorted(here.glob("bench_*.py")):
    print(f"\n===== {script.name} =====", flush=True)
    if subprocess.call([sys.executable, str(script)] + sys.argv[1:]) != 0:
        failed.append(script.name)
if failed:
    print(f"benchmarks failed: {', '.join(failed)}")
    sys.exit(1)
