"""Parse time of each DAG file, measured the way the dag-processor pays it.

Each measurement is a fresh Python process that imports Airflow first (the dag-processor's parsing
process already has it), then parses one DAG file with a DagBag and reports the file's parse time
(DagBag's own ``FileLoadStat``), the DAGs it defines and the modules the file pulled in (the probe
of tests/dag_probe.py, which tests/test_dag_integrity.py checks). Prints a table and writes
``benchmarks/results/dag_parse_times.json``.

    .venv/bin/python benchmarks/dag_parse_times.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from tests.dag_probe import dag_files, probe_in_subprocess  # noqa: E402

RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "dag_parse_times.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="airflow-parse-") as airflow_home:
        for dag_file in dag_files():
            runs = [probe_in_subprocess(dag_file, airflow_home) for _ in range(args.repeat)]
            seconds = [r["seconds"] for r in runs]
            rows.append({"file": dag_file.name, "dags": sorted(runs[0]["dags"]), "repeat": args.repeat,
                         "median_s": round(statistics.median(seconds), 4), "max_s": round(max(seconds), 4),
                         "heavy_modules": runs[0]["heavy_modules"], "import_errors": runs[0]["import_errors"]})
    print(f"{'DAG file':<24} {'DAGs':<28} {'median s':>9} {'max s':>8}  heavy imports")
    for row in rows:
        print(f"{row['file']:<24} {','.join(row['dags']):<28} {row['median_s']:>9.4f} {row['max_s']:>8.4f}  "
              f"{','.join(row['heavy_modules']) or '-'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "what": "DagBag parse time per DAG file, fresh process with Airflow pre-imported (dag-processor-like)",
        "command": "python benchmarks/dag_parse_times.py --repeat %d" % args.repeat,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "files": rows,
    }, indent=1))
    print(f"wrote {RESULTS.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
