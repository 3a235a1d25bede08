"""LLM retraining platform: the importable package behind the Airflow DAGs.

Kept import-light on purpose: DAG files import from here at parse time, so heavy libraries (torch,
transformers, great_expectations, boto3) are imported inside the functions that need them.
"""

__version__ = "0.1.0"
