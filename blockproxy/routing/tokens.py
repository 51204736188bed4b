"""Prompt-token estimate without a tokenizer: characters times a ratio learned per model.

The proxy never tokenizes.  It starts from about four characters per token and learns
each model's ratio from the ``usage.prompt_tokens`` that finished requests report.
"""

from __future__ import annotations


class PromptTokenEstimator:
    """Per-model tokens-per-character ratio, an exponentially weighted mean."""

    def __init__(self, default_ratio: float = 0.25, weight: float = 0.05) -> None:
        self.default_ratio = default_ratio
        self.weight = weight
        self._ratio: dict[str, float] = {}
        self._samples: dict[str, int] = {}

    def estimate(self, model: str, chars: int) -> int:
        """Estimated prompt tokens of a prompt of ``chars`` characters."""
        return max(1, round(chars * self._ratio.get(model, self.default_ratio)))

    def observe(self, model: str, chars: int, tokens: int) -> None:
        """Fold in the true token count of a finished request's prompt."""
        if chars <= 0 or tokens <= 0:
            return
        ratio = tokens / chars
        seen = self._samples.get(model, 0) + 1
        self._samples[model] = seen
        old = self._ratio.get(model, ratio)
        weight = max(self.weight, 1.0 / seen)
        self._ratio[model] = old + weight * (ratio - old)

    def ratio(self, model: str) -> float:
        return self._ratio.get(model, self.default_ratio)
