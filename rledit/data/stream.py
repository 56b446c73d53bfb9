"""A seeded stream of T editing steps of B requests each: the lifelong-editing schedule."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from rledit.data.formats import DataError
from rledit.types import EditRequest


class EditStream:
    """T steps of B edit requests, drawn without replacement from ``requests``.

    With ``seed=None`` the requests are taken in the given order (the first T×B); with an integer seed they are
    first shuffled by ``random.Random(seed)``, so the same seed always gives the same stream. Iterating yields
    ``steps`` lists of ``batch`` requests (it can be iterated again, with the same result); ``len()`` is
    ``steps``; :attr:`edits` holds all T×B requests in stream order.
    """

    def __init__(self, requests: Sequence[EditRequest], steps: int, batch: int, seed: int | None = None) -> None:
        for name, value in (("steps", steps), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        wrong = next((r for r in requests if not isinstance(r, EditRequest)), None)
        if wrong is not None:
            raise TypeError(f"requests must be EditRequest objects, got {type(wrong).__name__}")
        needed = steps * batch
        if needed > len(requests):
            raise DataError(f"a {steps}x{batch} stream needs {needed} requests but only {len(requests)} were "
                            "given; lower steps or batch, or load more requests")
        order = list(range(len(requests)))
        if seed is not None:
            random.Random(seed).shuffle(order)
        self.steps = steps
        self.batch = batch
        self.seed = seed
        self.edits: tuple[EditRequest, ...] = tuple(requests[i] for i in order[:needed])

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[EditRequest]]:
        for step in range(self.steps):
            yield list(self.edits[step * self.batch:(step + 1) * self.batch])

    def __repr__(self) -> str:
        return f"EditStream(steps={self.steps}, batch={self.batch}, seed={self.seed})"
