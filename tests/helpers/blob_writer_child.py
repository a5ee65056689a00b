"""Child process of the blob store crash test: writes blobs until it is killed.

Usage: blob_writer_child.py STORE_ROOT SEED

Prints ``ready`` once the reactor runs, then streams blobs of a few MB (and some small
ones) through the real FilesystemBlobStore writer in chunks, like SMTP DATA would,
deleting all but the last few again so that the disk does not fill.
It stops by itself after a while, so that a lost parent does not leave it running.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from lightmail.storage.blobs import FilesystemBlobStore

BIG = 3 * 1024 * 1024
CHUNK = 32 * 1024
KEEP = 4                # older blobs are deleted again, to bound the disk space used
LIFETIME = 60.0


@defer.inlineCallbacks
def write_blobs(store: FilesystemBlobStore, rng: random.Random):  # type: ignore[no-untyped-def]
    written: list[str] = []
    i = 0
    while True:
        size = BIG + rng.randrange(CHUNK) if i % 3 else rng.randrange(1, 100_000)
        i += 1
        data = rng.randbytes(size)
        writer = store.writer()
        for n, offset in enumerate(range(0, size, CHUNK)):
            writer.write(data[offset:offset + CHUNK])
            if n % 8 == 7:
                # Let the pool's background appends run, as a network peer would.
                yield task.deferLater(reactor, 0, lambda: None)
        ref = yield writer.finish()
        written.append(ref.id)
        if len(written) > KEEP:
            yield threads.deferToThreadPool(store.reactor, store.pool, store.delete_now,
                                            written.pop(0), time.time() + 60)


def main() -> None:
    root, seed = Path(sys.argv[1]), int(sys.argv[2])
    pool = ThreadPool(minthreads=1, maxthreads=2, name="crash-child")
    pool.start()
    store = FilesystemBlobStore(root, pool)

    def started() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        write_blobs(store, random.Random(seed)).addErrback(failed)

    def failed(failure: Failure) -> None:
        failure.printTraceback()
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(started)  # type: ignore[attr-defined]
    reactor.callLater(LIFETIME, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    pool.stop()


if __name__ == "__main__":
    main()
