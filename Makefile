# The two commands of README.md: `make demo` and `make test`. Each does all set-up on a fresh
# machine: redis-server (Debian package, when missing and we are root), a virtualenv in .venv,
# the package with its test and otlp extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup redis protos clean

demo: setup
	$(BIN)/epdserve demo

test: setup
	$(BIN)/pytest; status=$$?; if [ $$status -eq 5 ]; then exit 0; else exit $$status; fi

setup: redis $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,otlp]'
	touch $@

redis:
	@command -v redis-server >/dev/null || scripts/install-redis.sh

protos:
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
