"""The long run of ``make fuzz``: many inputs per protocol, progress and inputs/s.

    python tests/fuzzing/run.py --protocol imap --inputs 1000000 [--seconds 3600]

The reactor runs in the main thread, hypothesis in another (``driver.py``).  Inputs
are generated in rounds of ``--round`` examples, each a fresh hypothesis run with a
new random seed: one run of a million examples would keep every choice it ever made
in memory (hypothesis's tree of tried inputs).  After a defect hypothesis has shrunk
its input, which is printed and appended to ``.hypothesis/fuzz-defects.txt``; the run
goes on with the next round.  The run ends after ``--inputs`` inputs or ``--seconds``,
whichever comes first, and prints the figure reached.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import reactor
from twisted.logger import globalLogBeginner

from fuzzing.driver import STRATEGIES, Harness, fuzz

# Each defect's shrunk input, appended (hypothesis's own database would replay it
# first in every later round, and the run would find nothing else).
DEFECTS = Path(".hypothesis") / "fuzz-defects.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=sorted(STRATEGIES), action="append",
                        help="repeat for several; default: all four, one after another")
    parser.add_argument("--inputs", type=int, default=1_000_000, help="per protocol")
    parser.add_argument("--seconds", type=float, default=0, help="per protocol; 0: none")
    parser.add_argument("--round", type=int, default=5000, help="examples per round")
    parser.add_argument("--variants", type=int, default=10,
                        help="inputs played per generated one (see grammar.vary)")
    parser.add_argument("--max-defects", type=int, default=10,
                        help="per protocol: stop it after this many")
    args = parser.parse_args()
    # Nothing is printed of the sessions' logs: the observer in play.py sees failures.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    outcome: list[int] = []

    def body() -> None:
        try:
            outcome.append(run(args))
        except BaseException:
            traceback.print_exc()
            outcome.append(1)
        finally:
            reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    threading.Thread(target=body, daemon=True).start()
    reactor.run()  # type: ignore[attr-defined]
    return outcome[0] if outcome else 1


def run(args: argparse.Namespace) -> int:
    status = 0
    # On tmpfs where there is one: every message filed is fsynced, and a million
    # inputs are not about the disk.
    where = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lightmail-fuzz-", dir=where) as tmp:
        harness = Harness(Path(tmp))
        harness.warm_up()
        try:
            for protocol in args.protocol or ["smtp", "lmtp", "pop3", "imap"]:
                status |= run_protocol(harness, protocol, args)
        finally:
            harness.stop()
    return status


def run_protocol(harness: Harness, protocol: str, args: argparse.Namespace) -> int:
    started = time.monotonic()
    done = [0]
    last = [started]

    def counted() -> None:
        done[0] += 1
        now = time.monotonic()
        if now - last[0] >= 30:
            last[0] = now
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"{protocol}: {done[0]} inputs, {done[0] / (now - started):.0f}/s, "
                  f"max RSS {rss} MiB", flush=True)

    def out_of_time() -> bool:
        return bool(args.seconds) and time.monotonic() - started >= args.seconds

    defects = 0
    while done[0] < args.inputs and not out_of_time() and defects < args.max_defects:
        examples = min(args.round, args.inputs - done[0])
        seed = random.getrandbits(64)
        try:
            fuzz(harness, protocol, max(1, examples // args.variants), seed=seed,
                 on_input=counted, variants=args.variants)
        except Exception as exc:
            defects += 1
            # A flaky failure (an exception group) hides what failed: say it too.
            inner = "".join(f"\n  {type(e).__name__}: {e}"
                            for e in getattr(exc, "exceptions", ()))
            report = (f"{protocol}: DEFECT after {done[0]} inputs (seed {seed}):\n"
                      f"{type(exc).__name__}: {exc}{inner}\n")
            print(report, flush=True)
            DEFECTS.parent.mkdir(exist_ok=True)
            with DEFECTS.open("a") as out:
                out.write(report + "\n")
    elapsed = time.monotonic() - started
    print(f"{protocol}: {done[0]} inputs in {elapsed:.0f}s "
          f"({done[0] / elapsed:.0f}/s), {defects} defects", flush=True)
    return 1 if defects else 0

if __name__ == "__main__":
    sys.exit(main())
