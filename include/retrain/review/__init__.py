"""Active learning (issue 19): after each evaluation, the hard examples of the newest production traffic go to a
human review queue, and the reviewers' answers come back as corrections the next month trains on.

* :mod:`retrain.review.select` answers the run's rows with the production (or base) model and the candidate and
  scores how hard each row is: a low margin between the candidate's top two tokens where the primary label's value
  starts, the two models disagreeing on the primary label, an answer that breaks the output schema;
* :mod:`retrain.review.queue` is the ``review_queue`` table (idempotent per run) and the write-back of reviewed
  answers to ``production_examples``;
* :mod:`retrain.review.labelstudio` writes the Label Studio import file and labeling config, and reads what Label
  Studio exports;
* :mod:`retrain.review.workflow` ties them together for the ``select_for_review`` task and ``retrain review``.
"""
