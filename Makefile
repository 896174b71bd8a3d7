# `make pipeline` and `make test` are the two commands a newcomer needs; both set up .venv first.
PYTHON ?= python3
# `make server PORT=4300` sets it; not ?=, since a PORT in the environment may be another's.
PORT = 4200
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# dvc.yaml's `python -m stages.<name>` must find the venv's python.
export PATH := $(abspath $(BIN)):$(PATH)
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
# `dvc artifacts get` asks DVC Studio first whenever a Studio token is configured.
export DVC_STUDIO_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export ORT_DISABLE_TELEMETRY := 1

.PHONY: setup pipeline test verify server deploy worker lint clean

setup: $(STAMP)

# Reinstalls only when the project's dependencies change, so a second `make setup` takes seconds.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

pipeline: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Rehashes every out and cache object and compares them with dvc.lock and the model card:
# `dvc status` trusts mtimes, so it misses a cache object corrupted with its mtime kept.
verify: setup
	$(BIN)/python -m stages.verify

# The Prefect server and UI on 127.0.0.1:$(PORT) (`make server PORT=4300`). The UI's browser code
# calls the API at PREFECT_UI_API_URL, which defaults to port 4200: without it, another port shows
# a blank "Oops. Something went wrong" page.
server: export PREFECT_UI_API_URL = http://127.0.0.1:$(PORT)/api
server: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PORT)

# prefect.yaml's deployment on the server at PREFECT_API_URL: its work pool (unless it exists),
# the deployment, and the automation that marks a dead worker's runs Crashed (unless it exists).
POOL = fashion-mnist
REQUIRE_API_URL = test -n "$$PREFECT_API_URL" || { echo "error: PREFECT_API_URL is unset: export the Prefect server's API URL (docs/workers.md)" >&2; exit 1; }
AUTOMATION = fashion-mnist: crash flow runs that stopped beating
deploy: setup
	@$(REQUIRE_API_URL)
	$(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || $(BIN)/prefect work-pool create $(POOL) --type process
	$(BIN)/prefect --no-prompt deploy --all
	$(BIN)/prefect automation inspect "$(AUTOMATION)" >/dev/null 2>&1 || $(BIN)/prefect automation create --from-file flows/automations.yaml

# A Prefect worker for prefect.yaml's deployment: it polls the work pool $(POOL) and runs each flow
# run in this checkout, one at a time (docs/workers.md). Needs PREFECT_API_URL.
worker: setup
	@$(REQUIRE_API_URL)
	FMNIST_WORKER_REPO="$(CURDIR)" $(BIN)/prefect worker start --pool $(POOL) --limit 1

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
