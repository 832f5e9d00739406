# The two commands a newcomer needs: `make demo` and `make test` (both as root, on Debian).
# Each installs what it needs first: Debian packages, then a virtualenv with the five packages.

VENV ?= .venv
PYTHON ?= /usr/bin/python3
PY := $(VENV)/bin/python
APT_PACKAGES := iproute2 iptables nftables openssh-server openssh-client curl iperf3 \
	dnsutils dnsmasq-base procps util-linux strace systemd python3 python3-venv
TOOLS := pytest pytest-xdist hypothesis ruff mypy atheris
PACKAGES := protocol local agent firewalld client
# The tests run in parallel workers (pytest-xdist). Most of their time is spent waiting on
# processes and the network in namespaces, so more workers than cores pay off; worksteal
# lets an idle worker take tests queued on a busy one (the integration tests come in a block).
# PYTEST_JOBS=0 runs them in one process (for -s, --pdb or a single test).
PYTEST_JOBS ?= 4
PARALLEL := -n $(PYTEST_JOBS) --dist worksteal

.PHONY: install apt test lint unit integration demo bench clean

install: apt $(VENV)/.installed

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# After the Makefile: a venv made before a tool was added to TOOLS gets it.
$(VENV)/.installed: $(addsuffix /pyproject.toml,$(PACKAGES)) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(addprefix -e ./,$(PACKAGES)) $(TOOLS)
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy protocol/shuttle_protocol local/shuttle_local agent/shuttle_agent \
		firewalld/shuttle_firewalld client/shuttle_client testbed bench

unit: install
	$(PY) -m pytest -m "not integration and not slow" $(PARALLEL) $(PYTEST_ARGS)

integration: install
	$(PY) -m pytest -m "integration and not slow" $(PARALLEL) $(PYTEST_ARGS)

test: lint
	$(PY) -m pytest -m "not slow" $(PARALLEL) $(PYTEST_ARGS)

demo: install
	$(PY) -m testbed.demo

# BENCH_ARGS: e.g. --quick, or --json=bench/results/bench.json (python -m bench --help)
bench: install
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.rules
	$(PY) -m bench.proxies

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
