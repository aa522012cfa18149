"""fashion-tagging: tag a fashion catalog with a multimodal (image + text) classifier.

All logic lives in this package; it never imports Airflow, so it runs the same from the
command line, from tests and from the thin DAGs in ``dags/``.
"""

__version__ = "0.1.0"
