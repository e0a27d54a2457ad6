"""Stop strings on streamed text: what may be sent now, so that no part of a stop string ever is.

The engine's detokenizer already yields exactly-once text deltas (an incomplete UTF-8 tail waits for the
token that completes it); this filter sits behind it. It holds back the longest tail that could still
begin a stop string, cuts the text where the first stop string to complete begins, and releases the held
tail at the end. Every position where a stop string could start is either in the held tail or not yet
received, so a stop string is found whole however the text is split into deltas."""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False  # a stop string was found: nothing more is sent

    def add(self, delta: str, final: bool) -> str:
        """Feeds one text delta; returns the text that may be sent now (maybe empty)."""
        if self.stopped:
            return ""
        text = self.held + delta
        # The stop string that completes first (as the text grows) wins, the longest on a tie, so where the
        # text is cut does not depend on how it was split into deltas.
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)[1]]
        keep = 0 if final else self._open_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def _open_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
