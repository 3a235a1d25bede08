"""A use case's ``review:`` section (issue 19, active learning): which production rows go to human review.

```yaml
review:
  max_examples: 50      # keep at most this many hard examples per run (0 turns the review queue off)
  max_scored: 50        # score at most this many of the run's rows (a deterministic sample of the batch)
  margin_below: 1.0     # a candidate log-prob margin (top1 - top2, nats) under this at the primary label is "low"
  table_sample: 0       # also score this many older rows of the table not yet corrected by a human (default off)
  score_remote_models: false   # openai-backend models answer per paid request (and have no margins): opt in
```

Pydantic only (safe at DAG parse time); retrain.review does the work.
"""

from __future__ import annotations

from pydantic import Field

from retrain.schemas.base import _Strict


class ReviewConfig(_Strict):
    """After evaluation, the run's newest production rows are answered by the production (or base) model and the
    candidate; the hardest ones (low margin, disagreement, schema failures) go to the review_queue table and a
    Label Studio import file."""

    max_examples: int = Field(50, ge=0, le=10_000, description="hard examples kept per run, hardest first (0: off)")
    max_scored: int = Field(
        50, ge=1, le=100_000, description="rows scored per run, a deterministic sample of the batch when it is "
                                           "larger: both models answer every scored row, so this bounds the task's "
                                           "time (about 2 x max_scored generations)")
    margin_below: float = Field(
        1.0, ge=0, le=50, description="a candidate margin (log-prob of its top token minus the second's, in nats, "
                                      "where the primary label's value starts) below this makes an example hard")
    score_remote_models: bool = Field(
        False, description="also run when a model is served by an OpenAI-compatible API (paid per request, and no "
                           "logits: no margins, only disagreement and schema failures); off: such runs queue nothing")
    table_sample: int = Field(
        0, ge=0, le=100_000, description="also score this many older rows of production_examples without a human "
                                         "correction (a per-run random sample; 0 = only the rows collected this run)")
