"""A use case's ``pii:`` block: which optional personal-data detectors scrubbing runs.

E-mails, phones, cards, IBANs, SSNs and DNI/NIE are always scrubbed (retrain.data.scrub). Person names and postal
addresses are heuristics (greeting/sign-off context, a first-name list, street keywords + number, postcodes) that
also catch some business words, so each use case opts in::

    pii:
      names: true       # "Best regards,\\nMaría García", "Hi John,"
      addresses: true   # "Calle Mayor 12, 28013 Madrid", "221B Baker Street"
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PiiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    names: bool = Field(False, description="replace person names (greetings, sign-offs, known first names) by [NAME]")
    addresses: bool = Field(False, description="replace postal addresses (street + number, postcode + city) by "
                                               "[ADDRESS]")
