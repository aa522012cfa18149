"""Parse time of each DAG file, measured the way the dag-processor pays it.

Each measurement is a fresh Python process that imports Airflow first (the dag-processor's parsing
process already has it), then parses one DAG file with a DagBag and reports the file's parse time
(DagBag's own ``FileLoadStat``), the DAGs it defines and the modules the file pulled in. Prints a
table and writes ``benchmarks/results/dag_parse_times.json``.

    .venv/bin/python benchmarks/dag_parse_times.py [--repeat 5]

``--probe FILE`` is the child mode (one JSON line); tests/test_dag_integrity.py uses it too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAGS_DIR = PROJECT_ROOT / "dags"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "dag_parse_times.json"
# Modules a DAG file must never import at parse time (they cost seconds and memory per parse).
HEAVY_MODULES = ("tensorflow", "keras", "pandas", "numpy", "pyarrow", "boto3", "PIL", "matplotlib",
                 "alembic", "psycopg2", "pgvector")


def probe(dag_file: Path) -> dict:
    """Child mode: parse one DAG file in this (fresh) process and describe it."""
    import airflow.sdk  # noqa: F401  (already imported in the real dag-processor)
    from airflow.dag_processing.dagbag import DagBag

    before = set(sys.modules)
    bag = DagBag(dag_folder=str(dag_file), bundle_path=str(dag_file.parent))
    new_modules = sorted({name.split(".")[0] for name in set(sys.modules) - before})
    stat = bag.dagbag_stats[0] if bag.dagbag_stats else None
    return {
        "file": dag_file.name,
        "seconds": stat.duration.total_seconds() if stat else None,
        "import_errors": {Path(k).name: v for k, v in bag.import_errors.items()},
        "new_top_level_modules": new_modules,
        "heavy_modules": [m for m in new_modules if m in HEAVY_MODULES],
        "fashion_tagging_modules": sorted(m for m in sys.modules if m.startswith("fashion_tagging")),
        "dags": {
            dag_id: {
                "tags": sorted(dag.tags),
                "owners": sorted({task.owner for task in dag.tasks}),
                "retries": {task.task_id: task.retries for task in dag.tasks},
                "tasks": len(dag.tasks),
            }
            for dag_id, dag in bag.dags.items()
        },
    }


def airflow_env(airflow_home: str) -> dict:
    """An isolated, example-free Airflow configuration for parsing."""
    return {
        **os.environ,
        "AIRFLOW_HOME": airflow_home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home}/airflow.db",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }


def probe_in_subprocess(dag_file: Path, airflow_home: str) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--probe", str(dag_file)], env=airflow_env(airflow_home),
                               capture_output=True, text=True, timeout=120, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def dag_files() -> list[Path]:
    return sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.probe:
        import logging

        logging.disable(logging.CRITICAL)
        print(json.dumps(probe(args.probe.resolve())))
        return

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
