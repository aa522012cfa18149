"""Progress lines: the batch logger, the per-epoch Keras callback, and the demo's live view of a DAG run."""

from __future__ import annotations

import logging

import numpy as np

from fashion_tagging.progress import DagRunFollower, ProgressLogger, epoch_logger, task_log_lines

# The shape of ``airflow dags test`` output (structlog console lines, a traceback in between).
DAG_TEST_OUTPUT = """\
2026-11-29T21:44:30.119348Z [info     ] [DAG TEST] starting task_id=train map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1501
2026-11-29T21:44:34.760784Z [info     ] Task started                   [airflow.api_fastapi.execution_api.routes.task_instances] hostname=vm
2026-11-29T21:44:47.157628Z [info     ] embedding 250 images with efficientnet-lite0 at 64px (0 cached) [fashion_tagging.features] loc=features.py:140
2026-11-29T21:45:06.999362Z [info     ] Done. Returned value was: {'version': 'v1'} [task] loc=task_runner.py:1
2026-11-29T21:45:07.381848Z [info     ] [DAG TEST] end task task_id=train map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1563
2026-11-29T21:45:07.389530Z [info     ] [DAG TEST] starting task_id=tag_batch map_index=3 [airflow.sdk.definitions.dag] loc=dag.py:1501
2026-11-29T21:45:08.000000Z [info     ] Returned value was: {'version': 'v1'} [fashion_tagging.pipeline] loc=pipeline.py:1
2026-11-29T21:45:12.378186Z [error    ] Task failed with exception     [task] loc=task_runner.py:1676
Traceback (most recent call last):
  File "/work/main/fashion_tagging/pipeline.py", line 68, in ingest_new_manifests
    from fashion_tagging.ingest import load_catalog_into_db
ValueError: bad manifest
2026-11-29T21:45:12.405891Z [info     ] Task instance state updated    [airflow.api_fastapi.execution_api.routes.task_instances] new_state=up_for_retry rows_affected=1
2026-11-29T21:45:12.419372Z [info     ] [DAG TEST] end task task_id=tag_batch map_index=3 [airflow.sdk.definitions.dag] loc=dag.py:1563
2026-11-29T21:45:13.426381Z [warning  ] No tasks to run. unrunnable tasks: {}  [airflow.models.dagrun] loc=dagrun.py:1
"""


def test_dag_run_follower_shows_tasks_our_lines_and_errors_only(tmp_path):
    shown: list[str] = []
    follower = DagRunFollower(shown.append)
    for line in DAG_TEST_OUTPUT.splitlines():
        follower(line)

    assert shown == [
        "   21:44:30 train ...",
        "   21:44:47   embedding 250 images with efficientnet-lite0 at 64px (0 cached)",
        "   21:45:07 train finished in 37s",
        "   21:45:07 tag_batch[3] ...",
        "   21:45:08   Returned value was: {'version': 'v1'}",
        "   21:45:12   ERROR: Task failed with exception",
        "            ValueError: bad manifest",
        "   21:45:12   task up for retry",
        "   21:45:12 tag_batch[3] finished in 5s",
    ]

    log = tmp_path / "run.log"
    log.write_text(DAG_TEST_OUTPUT)
    lines = task_log_lines(log, "tag_batch", tail=3)
    assert lines[0] == "ValueError: bad manifest" and lines[1].endswith("new_state=up_for_retry rows_affected=1")
    assert "end task task_id=tag_batch" in lines[-1] and len(lines) == 3
    assert task_log_lines(log, "tag_batch")[0].endswith("starting task_id=tag_batch map_index=3 "
                                                       "[airflow.sdk.definitions.dag] loc=dag.py:1501")
    assert task_log_lines(log, "no_such_task") == []


def test_progress_logger_logs_batches_rate_and_eta(caplog):
    now = [0.0]
    progress = ProgressLogger(3000, "products", logging.getLogger("test.progress"), every_s=5, batches=3,
                              clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for _ in range(3):
            now[0] += 2.0
            progress.update(1000)
        progress.finish()

    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "batch 1/3: 1000/3000 products (33.3%), 500.0 products/s, eta 4s"
    assert lines[-1] == "batch 3/3: 3000/3000 products (100.0%), 500.0 products/s"
    assert len(lines) == 2  # batches 2 and 3 came under every_s after batch 1; finish() logs the last


def test_progress_logger_label_and_long_eta(caplog):
    now = [0.0]
    progress = ProgressLogger(100_000, "img", logging.getLogger("test.progress"), label="image embeddings",
                              clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.progress"):
        now[0] += 10.0
        progress.update(500)
    assert caplog.records[0].getMessage() == "image embeddings: 500/100000 img (0.5%), 50.0 img/s, eta 33m10s"


def test_epoch_logger_logs_one_line_per_epoch(caplog):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax", name="articleType")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=[keras.metrics.SparseCategoricalAccuracy("acc")])
    x, y = np.zeros((8, 2), np.float32), np.zeros(8, np.int64)
    with caplog.at_level(logging.INFO, logger="test.epochs"):
        model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0,
                  callbacks=[epoch_logger("stage 1", 2, "acc", logging.getLogger("test.epochs"))])
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("stage 1 epoch 1/2: loss ") and ", acc 1.0000, val 1.0000 (" in lines[0]
    assert lines[1].startswith("stage 1 epoch 2/2: ")


def test_resident_memory_sampler_tells_mapped_file_pages_from_heap(tmp_path):
    """A read memory-mapped file raises the file-backed peak, a heap array the anonymous one."""
    import numpy as np

    from fashion_tagging.progress import ResidentMemorySampler

    path = tmp_path / "mapped.npy"
    np.save(path, np.ones(48 * 2**20 // 8))
    with ResidentMemorySampler(every_s=0.01) as sampler:
        before = sampler.sample()
        mapped = np.load(path, mmap_mode="r")
        assert float(mapped.sum()) == 48 * 2**20 // 8  # every page read, through the mapping
        after_mapped = sampler.sample()
        heap = np.full(64 * 2**20 // 8, 2.0)
        after_heap = sampler.sample()
        del mapped, heap
    assert after_mapped["file"] - before["file"] >= 40
    assert after_heap["anonymous"] - after_mapped["anonymous"] >= 56
    assert round(sampler.peak["anonymous"]) >= after_heap["anonymous"]
