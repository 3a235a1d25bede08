"""Voice attribution: whose writing does a text look like? Character n-grams + logistic regression (scikit-learn).

Trained on the tenants' own training e-mails, it names the tenant a generated reply sounds like. The share of a
tenant's candidate replies attributed to that tenant is the ``attribution`` metric: a fine-tuned adapter should be
attributed to its own user far more often than the base model is. Character n-grams (within word boundaries) pick up
greetings, sign-offs, recurring phrases, punctuation and language mix without any tokenizer.

Deterministic: same texts and tenants in the same order give the same model (lbfgs, no random state involved).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrain.rundir import atomic_write

FORMAT = "retrain.voice_classifier/1"
# Returned by predict() when min_confidence is set and no tenant reaches it.
UNATTRIBUTED = "(unattributed)"


class AttributionError(ValueError):
    """The classifier cannot be trained or loaded as asked (the message says why and what to do)."""


class VoiceClassifier:
    """``VoiceClassifier().fit(texts, tenants)``, then ``predict(texts) -> [tenant, ...]``.

    ``min_confidence``: when set, a text whose most likely tenant has a probability below it is attributed to no
    one (``UNATTRIBUTED``), so a generic reply is not credited to a tenant by a coin toss among the writers."""

    def __init__(self, *, ngram_range: tuple[int, int] = (2, 4), c: float = 10.0, min_confidence: float | None = None,
                 max_features: int | None = 200_000):
        if min_confidence is not None and not 0 <= min_confidence <= 1:
            raise AttributionError(f"min_confidence must be between 0 and 1, got {min_confidence}")
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.c = float(c)
        self.min_confidence = min_confidence
        self.max_features = max_features
        self._vectorizer: Any = None
        self._model: Any = None
        self.classes: list[str] = []
        self.n_train = 0

    # --- training ---------------------------------------------------------------------------------------------

    def fit(self, texts: list[str], tenants: list[str]) -> VoiceClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        texts, tenants = list(texts), [str(t) for t in tenants]
        if len(texts) != len(tenants):
            raise AttributionError(f"texts and tenants must pair up, got {len(texts)} texts and {len(tenants)} tenants")
        distinct = sorted(set(tenants))
        if len(distinct) < 2:
            raise AttributionError(
                f"a voice classifier needs e-mails of at least 2 tenants to tell voices apart, got "
                f"{len(distinct)} ({', '.join(distinct) or 'none'}); add another tenant's data or skip attribution")
        texts = [t if isinstance(t, str) else "" for t in texts]
        self._vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=self.ngram_range, sublinear_tf=True,
                                           lowercase=False, max_features=self.max_features)
        features = self._vectorizer.fit_transform(texts)
        self._model = LogisticRegression(C=self.c, max_iter=2000, solver="lbfgs")
        self._model.fit(features, tenants)
        self.classes = [str(c) for c in self._model.classes_]
        self.n_train = len(texts)
        return self

    def _require_fitted(self) -> None:
        if self._model is None:
            raise AttributionError("the voice classifier is not trained: call fit(texts, tenants) or load(path) first")

    # --- prediction -------------------------------------------------------------------------------------------

    def _proba(self, texts: list[str]):
        self._require_fitted()
        texts = [t if isinstance(t, str) else "" for t in texts]
        return self._model.predict_proba(self._vectorizer.transform(texts))

    def predict_proba(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text: {tenant: probability} over the tenants seen in training (sums to 1)."""
        if not texts:
            return []
        return [{c: float(p) for c, p in zip(self.classes, row)} for row in self._proba(list(texts))]

    def predict(self, texts: list[str]) -> list[str]:
        """The most likely tenant per text (``UNATTRIBUTED`` below ``min_confidence`` when that is set)."""
        if not texts:
            self._require_fitted()
            return []
        out = []
        for row in self._proba(list(texts)):
            best = int(row.argmax())
            if self.min_confidence is not None and row[best] < self.min_confidence:
                out.append(UNATTRIBUTED)
            else:
                out.append(self.classes[best])
        return out

    def accuracy(self, texts: list[str], tenants: list[str]) -> float:
        predicted = self.predict(texts)
        return sum(p == str(t) for p, t in zip(predicted, tenants)) / len(predicted) if predicted else 0.0

    # --- persistence ------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """One joblib file at ``path`` (written atomically). Load only files this platform wrote: it is a pickle."""
        import joblib

        self._require_fitted()
        state = {"format": FORMAT, "classes": self.classes, "n_train": self.n_train,
                 "params": {"ngram_range": list(self.ngram_range), "c": self.c,
                            "min_confidence": self.min_confidence, "max_features": self.max_features},
                 "vectorizer": self._vectorizer, "model": self._model}
        with atomic_write(path, "wb") as fh:
            joblib.dump(state, fh)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> VoiceClassifier:
        import joblib

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no voice classifier at {path}: train one with VoiceClassifier().fit(...).save(path)")
        try:
            state = joblib.load(path)
        except Exception as exc:  # noqa: BLE001 - truncated or foreign file: say which file, not a pickle traceback
            raise AttributionError(f"{path} is not a readable voice classifier ({type(exc).__name__}); "
                                   "retrain it with VoiceClassifier().fit(...).save(path)") from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise AttributionError(f"{path} is not a voice classifier saved by this platform (expected format {FORMAT})")
        params = state["params"]
        clf = cls(ngram_range=tuple(params["ngram_range"]), c=params["c"], min_confidence=params["min_confidence"],
                  max_features=params["max_features"])
        clf._vectorizer, clf._model = state["vectorizer"], state["model"]
        clf.classes, clf.n_train = list(state["classes"]), int(state["n_train"])
        return clf
