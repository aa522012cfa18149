"""Parse one DAG file the way the dag-processor does and describe it (DAGs, import errors, modules pulled in).

Each probe is a fresh Python process that imports Airflow first (the dag-processor's parsing process
already has it), so Airflow's global configuration never leaks into the caller.
tests/test_dag_integrity.py checks the descriptions; benchmarks/dag_parse_times.py times them.

    python tests/dag_probe.py FILE    # the child: one JSON line
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAGS_DIR = PROJECT_ROOT / "dags"
# Modules a DAG file must never import at parse time (they cost seconds and memory per parse).
HEAVY_MODULES = ("tensorflow", "keras", "pandas", "numpy", "pyarrow", "boto3", "PIL", "matplotlib",
                 "alembic", "psycopg2", "pgvector")


def probe(dag_file: Path) -> dict:
    """Child mode: parse one DAG file in this (fresh) process and describe it."""
    importlib.import_module("airflow.sdk")  # already imported in the real dag-processor
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
    completed = subprocess.run([sys.executable, __file__, str(dag_file)], env=airflow_env(airflow_home),
                               capture_output=True, text=True, timeout=120, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def dag_files() -> list[Path]:
    return sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    print(json.dumps(probe(Path(sys.argv[1]).resolve())))
