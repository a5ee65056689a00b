# LightMail: `make run` starts a demo server, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/lightmail.conf

.PHONY: run test lint typecheck pytest services clean bench fuzz

$(BIN)/.installed: setup.cfg pyproject.toml
	scripts/bootstrap.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	# twistd finds plugins in twisted/plugins/ under any sys.path entry: put the
	# source tree there, whatever editable mode setuptools chose.
	$(BIN)/python -c 'import site, os; open(os.path.join(site.getsitepackages()[0], "lightmail-src.pth"), "w").write(os.getcwd() + "\n")'
	$(BIN)/twistd --help | grep lightmail >/dev/null || { echo "twistd does not see the lightmail plugin" >&2; exit 1; }
	touch $@

run: $(BIN)/.installed
	$(BIN)/lightmail --config $(CONFIG) demo-setup
	exec $(BIN)/twistd --pidfile= -n lightmail --config $(CONFIG)

services:
	scripts/test-services.sh
	scripts/test-peers.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check lightmail tests twisted docs/examples $(wildcard bench/*.py)

typecheck: $(BIN)/.installed
	$(BIN)/mypy lightmail

pytest: $(BIN)/.installed services
	$(BIN)/pytest

test: $(BIN)/.installed services lint typecheck pytest

# The long fuzzing run (docs/fuzzing.rst): a million inputs per protocol, or
# FUZZ_SECONDS per protocol if that comes first.  `make test` has the short run.
FUZZ_INPUTS ?= 1000000
FUZZ_SECONDS ?= 0
fuzz: $(BIN)/.installed
	status=0; for protocol in smtp lmtp pop3 imap; do \
		nice -n 10 $(BIN)/python tests/fuzzing/run.py --protocol $$protocol \
			--inputs $(FUZZ_INPUTS) --seconds $(FUZZ_SECONDS) || status=1; \
	done; \
	nice -n 10 $(BIN)/python tests/fuzzing/atheris_parsers.py -runs=$(FUZZ_INPUTS) \
		-timeout=2 -print_final_stats=1 || status=1; \
	exit $$status

bench: $(BIN)/.installed
	scripts/test-peers.sh
	$(BIN)/python bench/smtp.py --idle 1000

.PHONY: bench-lmtp bench-pop3 bench-outbound bench-imap bench-memory

bench-lmtp: $(BIN)/.installed
	scripts/test-peers.sh
	$(BIN)/python bench/lmtp.py

bench-pop3: $(BIN)/.installed
	scripts/test-peers.sh
	$(BIN)/python bench/pop3.py

bench-outbound: $(BIN)/.installed
	scripts/test-peers.sh
	$(BIN)/python bench/outbound.py

bench-imap: $(BIN)/.installed
	scripts/test-peers.sh
	$(BIN)/python bench/imap.py --big 100000

bench-memory: $(BIN)/.installed
	scripts/test-peers.sh
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) var build *.egg-info
