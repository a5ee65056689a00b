"""A milter on Sendmail's libmilter (Debian's python3-milter: pymilter, the C library
under it speaking the wire), run by Debian's python3, not the test's interpreter:

    python3 libmilter_edits.py SOCKET EDITS_JSON

At end of message it makes the envelope changes EDITS_JSON lists, each
``["chgfrom", ADDRESS, ARGS]`` or ``["addrcpt", ADDRESS, ARGS]`` (ARGS: the ESMTP
arguments as one string, or null for none): smfi_chgfrom and smfi_addrcpt_par, whose
packets (SMFIR_CHGFROM, SMFIR_ADDRCPT_PAR) libmilter itself lays out."""

import json
import sys

import Milter  # type: ignore[import-not-found]


def main() -> None:
    socket, edits = sys.argv[1], json.loads(sys.argv[2])

    class Edits(Milter.Base):  # type: ignore[misc]
        def eom(self) -> int:
            for kind, address, args in edits:
                if kind == "chgfrom":
                    self.chgfrom(address, args)
                else:
                    self.addrcpt(address, args)
            return Milter.CONTINUE

    Milter.factory = Edits
    Milter.set_flags(Milter.ADDRCPT | Milter.ADDRCPT_PAR | Milter.CHGFROM)
    Milter.runmilter("lightmail-test", f"unix:{socket}", 30)


if __name__ == "__main__":
    main()
