"""Coverage-guided fuzzing (atheris, libFuzzer) of IMAP's parsers, with no reactor:
``parser_target.one_input`` with the lightmail modules instrumented for coverage.

    python tests/fuzzing/atheris_parsers.py -runs=1000000 -timeout=2 [CORPUS_DIR]

libFuzzer prints its progress, and on a crash or a timeout the input and the file it
wrote it to (``crash-...``, ``timeout-...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["lightmail"]):
    from fuzzing.parser_target import one_input


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
