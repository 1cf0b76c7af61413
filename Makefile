# The two commands of the README: `make demo` and `make test`. Everything else is a step of them.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# uv keeps downloaded wheels in its cache outside the clone, so a second clone installs offline-fast.
export UV_CACHE_DIR ?= $(HOME)/.cache/loopstream/uv

.PHONY: demo tinker-demo test install system-deps up down status unit integration lint schemas cli-docs clean

demo: install up
	$(BIN)/loopstream db migrate
	$(BIN)/loopstream services up
	$(BIN)/python examples/rl_loop.py

# The same kind of RL loop written only against the official tinker SDK (docs/tinker.md).
tinker-demo: install up
	$(BIN)/loopstream db migrate
	$(BIN)/loopstream services up
	TINKER_BASE_URL=$$($(PY) -c 'from api.config import get_api_settings as s; print(s().base_url)') \
	TINKER_API_KEY=$${LOOPSTREAM_API_KEY:-$$($(PY) -c 'from api.bootstrap import ensure_default_key as k; from infra.settings import get_settings as s; print(k(s()))')} \
		$(BIN)/python examples/tinker_rl_loop.py

# The whole suite against the real stack; the stack is stopped at the end whatever happened.
test: install lint
	@set -o pipefail; \
	if $(BIN)/loopstream stack status >/dev/null 2>&1; then started_here=0; else started_here=1; fi; \
	$(BIN)/loopstream stack up || exit 1; \
	$(BIN)/loopstream db migrate || { [ $$started_here = 1 ] && $(BIN)/loopstream stack down; exit 1; }; \
	bash tests/run_all.sh; rc=$$?; \
	if [ $$started_here = 1 ]; then $(BIN)/loopstream stack down; fi; \
	exit $$rc

unit: install
	$(BIN)/pytest tests/unit

integration: install up
	$(BIN)/loopstream db migrate
	$(BIN)/pytest tests/integration

system-deps:
	@bash infra/system-deps.sh

install: system-deps $(VENV)/.installed

# --excludes (uv 0.9 and later): tinker-cookbook 0.6.1 (dev extra) requires tml-renderers>=0.4.1,
# which the package index does not have; the cookbook code the tests run (rl, supervised, math_rl,
# the role_colon renderer) never imports it, so it is left out of the resolution. The cookbook's
# other requirements install as usual.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || uv venv -q --python python3 $(VENV)
	VIRTUAL_ENV=$(abspath $(VENV)) uv pip install -q -e '.[dev]' --excludes <(echo tml-renderers)
	@touch $@

up: install
	$(BIN)/loopstream stack up

down:
	@test -x $(BIN)/loopstream && $(BIN)/loopstream services down || true
	@test -x $(BIN)/loopstream && $(BIN)/loopstream stack down || true

status:
	$(BIN)/loopstream stack status

# mypy covers the packages that are clean today; the others follow as they get there.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy commands events infra

# docs/cli.md from the CLI itself (tests/unit/test_cli.py fails when it is stale).
cli-docs: install
	$(PY) -m api.cli_reference

clean: down
	rm -rf .loopstream $(VENV)
