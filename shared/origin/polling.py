"""When a follower polls the origin's heads and acts on the feed's hints (sans-IO).

A fleet of followers started together (a rack rebooted, a deploy) would poll
the origin in lockstep and all download a new version the instant the feed
announces it; an origin in trouble would get every follower's retries at the
same pace. :class:`PollPolicy` spreads the first and backs off the second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_POLL_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """How long a follower waits between polls of the origin's heads (sans-IO).

    ``interval`` seconds after a poll that worked; after ``failures`` polls in a row
    failed, ``interval * 2**failures`` up to ``backoff_max`` (an origin in trouble is
    not hammered by a fleet). Each wait is then spread uniformly over
    ``[1 - jitter, 1 + jitter]`` of itself, so followers started together (a fleet
    rebooted at once) drift apart instead of polling in lockstep. ``pull_jitter``: a
    feed hint is acted on after a random 0 to ``pull_jitter`` seconds, so a fleet
    told of a new version at the same instant does not download it at the same one.
    """

    interval: float = DEFAULT_POLL_INTERVAL
    jitter: float = 0.2
    backoff_max: float = 60.0
    pull_jitter: float = 0.0

    def wait(self, failures: int, rng: random.Random) -> float:
        base = self.interval
        if failures > 0:
            base = max(self.interval, min(self.interval * 2.0 ** min(failures, 32),
                                          self.backoff_max))  # fmt: skip
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def hint_delay(self, rng: random.Random) -> float:
        return rng.uniform(0.0, self.pull_jitter) if self.pull_jitter > 0 else 0.0
