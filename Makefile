# Two entry points: `make run` (serve on the built-in random-weight checkpoint unless ARGS name
# weights) and `make test`. Each creates the virtualenv it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lockstep-installed
ARGS ?=

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	# A CPU build of torch unless a GPU is present (an unpinned torch pulls a multi-GB CUDA build).
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps moshi==0.2.13
	touch $(STAMP)

# Debian's chromium, for the web page's browser tests (Playwright drives it; nothing downloads a browser).
browser:
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Debian's libopus, which ws /api/chat's Opus encoder loads (api/opus.py; without it, sphn's slower writer).
libopus:
	ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopus0 >/dev/null; }

install: $(STAMP) browser libopus

run: $(STAMP)
	$(VENV)/bin/lockstep serve $(ARGS)

test: $(STAMP) browser libopus
	$(PY) -m pytest

.PHONY: browser install libopus run test
