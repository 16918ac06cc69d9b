# parley: `make run` to serve, `make test` to check. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

REDIS_URL ?= redis://127.0.0.1:6379/0
WORKERS ?= 2

.PHONY: install redis-server postgresql run-scaled npm chromium wrk valgrind run run-redis demo test fuzz screenshot lint format bench bench-instructions soak clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,redis,postgres,mcp,dev]'
	touch $@

# $(call debian,COMMAND,MESSAGE,ON_MISSING): install COMMAND's Debian package (same name) when it is missing and
# apt-get may be used; otherwise print MESSAGE and run ON_MISSING (say, exit 1).
debian = @command -v $(1) >/dev/null 2>&1 || { \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) >/dev/null); \
	else \
		echo "$(2)"; $(3) \
	fi; }

# The Redis tests start redis-server processes of their own; install the binary when it is missing.
redis-server:
	$(call debian,redis-server,redis-server is not installed: the Redis tests will be skipped (apt-get install redis-server),)

# The PostgreSQL tests start a cluster of their own (initdb and pg_ctl from Debian's postgresql, run as the
# postgres user in a temporary directory); install it when it is missing. (Its own service is not needed.)
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				postgresql >/dev/null); \
		else \
			echo "PostgreSQL is not installed: the PostgreSQL tests will be skipped (apt-get install postgresql)"; \
		fi; }

# The AI SDK tests drive parley with Vercel's `ai` package from Node, and a React app (useChat, built by Vite in the
# test) in Chromium; `npm ci` installs the versions pinned by tests/ai-sdk/package-lock.json (Debian's npm brings
# Node with it).
AI_SDK := tests/ai-sdk

npm:
	$(call debian,npm,npm is not installed: the AI SDK tests will be skipped (apt-get install npm),)

$(AI_SDK)/node_modules/.installed: $(AI_SDK)/package-lock.json | npm
	@if command -v npm >/dev/null 2>&1; then \
		cd $(AI_SDK) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	fi

# The page's tests drive Debian's Chromium through Playwright (Playwright's own browser download is not used).
chromium:
	$(call debian,chromium,chromium is not installed: the browser tests will be skipped (apt-get install chromium),)

wrk:
	$(call debian,wrk,make bench needs wrk (apt-get install wrk),exit 1;)

valgrind:
	$(call debian,valgrind,make bench-instructions needs valgrind (apt-get install valgrind),exit 1;)

run: install
	$(BIN)/uvicorn app:app --host $(HOST) --port $(PORT)

# A reply that reasons and calls a tool, with no model server and no GPU: the tests' scripted model server, the
# example MCP server and parley wired to both (tests/demo.py); it says what to open.
demo: install
	$(BIN)/python -m tests.demo --port $(PORT)

# Several worker processes sharing one Redis: cancels, the busy rule and history hold across them.
run-redis: install
	PARLEY_REDIS_URL=$(REDIS_URL) $(BIN)/uvicorn app:app --host $(HOST) --port $(PORT) --workers $(WORKERS)

# Scaled out: several workers on PostgreSQL (history, files' bytes) and Redis (claims, cancels, rejoins, limits);
# run the same on several hosts, each with its own PARLEY_DATA_DIR: they share no disk.
DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/parley
run-scaled: install
	PARLEY_DATABASE_URL=$(DATABASE_URL) PARLEY_REDIS_URL=$(REDIS_URL) \
		$(BIN)/uvicorn app:app --host $(HOST) --port $(PORT) --workers $(WORKERS)

# Two workers (pytest-xdist): most of a test's time is spent waiting on servers, replies and leases, so two
# at once take about half as long on two cores. Whole files per worker (loadfile), so that a module's browser
# or server is started once.
TEST_WORKERS ?= 2
test: install redis-server postgresql chromium $(AI_SDK)/node_modules/.installed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Schemathesis at length against a real uvicorn: many examples per operation, a new seed each run (printed, so a
# failure can be replayed with FUZZ_SEED=...), and the stateful phase that follows the document's links.
FUZZ_EXAMPLES ?= 500
FUZZ_SEED ?= $(shell date +%s)
fuzz: install
	PARLEY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PARLEY_FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/python -m pytest tests/test_openapi.py -k schemathesis -s -p no:cacheprovider

# docs/page.png: the page in Chromium against a real server, with a finished reply and a cancelled one.
screenshot: install chromium
	$(BIN)/python -m tests.screenshot docs/page.png

# Starts its own servers (and redis-server, PostgreSQL) on loopback, pinned to core 0, with the load generators on
# core 1; every figure under both uvicorn stacks, in at most 20 minutes; writes bench/RESULTS.md.
bench: install wrk redis-server postgresql
	$(BIN)/python -m pip install --quiet -e '.[server,redis,postgres,mcp,dev,bench]'
	$(BIN)/python -m bench.run --write

# Instructions per short chat (on each store), per token and per event, counted under callgrind: repeatable to
# 0.1%, for A/B of the hot path.
bench-instructions: install valgrind redis-server postgresql
	$(BIN)/python -m pip install --quiet -e '.[server,redis,postgres,mcp,dev,bench]'
	$(BIN)/python -m bench.instructions

lint: install
	@! git grep -n -E '^(<<<<<<<|>>>>>>>)( |$$)' -- . ':!*.lock' || { echo 'merge-conflict markers left in the files above'; exit 1; }
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info $(AI_SDK)/node_modules

# About 5 minutes: thousands of chats on SQLite, then on two workers sharing a redis-server it restarts, with a
# kill -9 of a worker; checks every promise at the end and exits non-zero on a violation. Not part of `make test`.
soak: install redis-server postgresql
	$(BIN)/python -m tests.soak
