"""Training backends. ``launch.train_qlora`` is what the Airflow task calls; ``qlora`` is the trainer process.

Nothing heavy is imported here: DAG files import this package.
"""

from retrain.train.launch import train_qlora

__all__ = ["train_qlora"]
