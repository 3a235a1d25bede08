"""Training backends. ``launch.train_qlora`` is what the Airflow task calls; ``qlora`` is the trainer process.

Nothing heavy is imported here: DAG files import this package.
"""




