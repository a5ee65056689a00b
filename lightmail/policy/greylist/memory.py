"""This process's memory of the passes a greylist store gave, in front of the store.

Most attempts on a busy MX are by known triplets and auto-allowed networks, and
the store answers them without a write (store.py): a SQL read in a pool thread, or
a Redis round trip, for each recipient.  The memory answers them instead, on the
reactor thread, for as long as the store would have given the same pass without
writing: until ``Verdict.fresh_until``, the entry's ``last_seen`` plus the lesser of
REFRESH and the confirmed expiry.  The first attempt after that goes to the store
again, which writes ``last_seen`` anew (at most once per REFRESH, as without the
memory) and says for how long the pass holds this time.  Only passes are
remembered: a refusal (``new``, ``early``) needs the store, which counts the
retry; so does a pass that is not the store's (``store down``).

Why several processes and nodes may each remember passes while sharing one store:
in store.py's rules a pass never turns into a refusal but by expiry (a triplet that
passed stays passed, a network's count of retries only grows, and the cleaning
deletes only expired entries), and no memory keeps a pass past the expiry the store
itself would apply.  What one process remembers, the store would answer everywhere.
The rules a pass was given under are part of it: when a reload changes them
(``auto_allow``, ``confirmed_expiry``), the memory starts empty.  In front of Redis
with the SQL fallback, a pass the fallback gave while Redis was away is remembered
as any other (for at most REFRESH), though Redis may not know the triplet: that errs
the way the fallback itself does, towards letting mail in.

The memory is bounded: at most ``size`` entries (a triplet or a network each), the
least recently used going first.  A forgotten pass costs one question to the store.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from lightmail.policy.greylist.store import IGreylistStore, Rules, Triplet, Verdict

#: Entries kept (about 250 octets each).
MEMORY_SIZE = 50_000


@implementer(IGreylistStore)
class RememberedPasses:
    """``store``, with the passes it gave remembered (at most ``size``)."""

    def __init__(self, store: IGreylistStore, size: int = MEMORY_SIZE) -> None:
        self.store = store
        self.size = size
        self._rules: Optional[Rules] = None
        # A network (auto-allowed) or a triplet (known): the pass, for as long as the
        # store would give it without a write.
        self._passes: OrderedDict[Union[str, Triplet], Verdict] = OrderedDict()

    def __len__(self) -> int:
        return len(self._passes)

    def attempt(self, triplet: Triplet, now: float, rules: Rules) -> Deferred[Verdict]:
        if rules != self._rules:
            self._passes.clear()
            self._rules = rules
        remembered = self._recall(triplet, now, rules)
        if remembered is not None:
            return defer.succeed(remembered)
        asked = self.store.attempt(triplet, now, rules)
        return asked.addCallback(self._remember, triplet)

    def _recall(self, triplet: Triplet, now: float, rules: Rules) -> Optional[Verdict]:
        keys: tuple[Union[str, Triplet], ...] = (
            (triplet.network, triplet) if rules.auto_allow else (triplet,))
        for key in keys:
            verdict = self._passes.get(key)
            if verdict is None:
                continue
            if now > verdict.fresh_until:
                del self._passes[key]       # the store refreshes it, or it expired
                continue
            self._passes.move_to_end(key)
            return verdict
        return None

    def _remember(self, verdict: Verdict, triplet: Triplet) -> Verdict:
        if verdict.wait > 0 or verdict.fresh_until <= 0:
            return verdict
        if verdict.why == "auto-allowed":
            self._keep(triplet.network, verdict)
        else:
            # A retry that passed is a known triplet from then on.
            self._keep(triplet, Verdict(0.0, "known", verdict.fresh_until))
        return verdict

    def _keep(self, key: Union[str, Triplet], verdict: Verdict) -> None:
        self._passes[key] = verdict
        self._passes.move_to_end(key)
        while len(self._passes) > self.size:
            self._passes.popitem(last=False)
