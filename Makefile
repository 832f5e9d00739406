# The two commands a newcomer needs: `make demo` and `make test` (both as root, on Debian).
# Each installs what it needs first: Debian packages, then a development virtualenv (make dev)
# with the six packages editable. `make install` (as root) puts shuttle on this machine
# system-wide, `make uninstall` takes it away again; `make dist` builds wheels and sdists.

VENV ?= .venv
PYTHON ?= /usr/bin/python3
PY := $(VENV)/bin/python
APT_PACKAGES := iproute2 iptables nftables openssh-server openssh-client curl iperf3 \
	dnsutils dnsmasq-base procps util-linux strace systemd python3 python3-venv sudo man-db passwd pipx
# build (with setuptools and wheel, for --no-isolation): make dist, without an index.
TOOLS := pytest pytest-xdist hypothesis ruff mypy atheris build setuptools wheel
PACKAGES := protocol ends local agent firewalld client
# The tests run in parallel workers (pytest-xdist). Most of their time is spent waiting on
# processes and the network in namespaces, so more workers than cores pay off; worksteal
# lets an idle worker take tests queued on a busy one (the integration tests come in a block).
# PYTEST_JOBS=0 runs them in one process (for -s, --pdb or a single test).
PYTEST_JOBS ?= 4
PARALLEL := -n $(PYTEST_JOBS) --dist worksteal

.PHONY: dev apt test lint unit integration demo bench dist man install uninstall as-root clean

dev: apt $(VENV)/.installed

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

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy protocol/shuttle_protocol ends/shuttle_ends local/shuttle_local agent/shuttle_agent \
		firewalld/shuttle_firewalld client/shuttle_client testbed bench tools

unit: dev
	$(PY) -m pytest -m "not integration and not slow" $(PARALLEL) $(PYTEST_ARGS)

integration: dev
	$(PY) -m pytest -m "integration and not slow" $(PARALLEL) $(PYTEST_ARGS)

test: lint
	$(PY) -m pytest -m "not slow" $(PARALLEL) $(PYTEST_ARGS)

demo: dev
	$(PY) -m testbed.demo

# BENCH_ARGS: e.g. --quick, or --json=bench/results/bench.json (python -m bench --help)
bench: dev
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.rules
	$(PY) -m bench.proxies
	$(PY) -m bench.agentpath

# `make dist`: a wheel and an sdist of each distribution in $(DIST); the wheels install
# together with one `pip install $(DIST)/*.whl`. Each wheel is built from its sdist (what
# build does by default), so a stale build/ directory in the clone cannot leak into it.
DIST ?= dist
BUILD ?= build

dist: dev
	rm -rf $(DIST)
	for p in $(PACKAGES); do $(PY) -m build -q --no-isolation --outdir $(DIST) ./$$p || exit 1; done

# The man pages, written from the programs' own --help text (tools/manpage.py) each time:
# the text is wherever the code keeps it, and writing them takes a moment.
MAN_PAGES := shuttle-client.1 shuttle-firewalld.8

man: dev
	mkdir -p $(BUILD)/man
	for page in $(MAN_PAGES); do \
		$(PY) -m tools.manpage $${page%.*} > $(BUILD)/man/$$page.new \
		&& mv $(BUILD)/man/$$page.new $(BUILD)/man/$$page || exit 1; \
	done

# `make install`: the six distributions' wheels in one venv of their own, $(LIBDIR), whose
# three programs are linked into $(BINDIR); the systemd units (their ExecStart naming
# $(BINDIR)) and a tmpfiles.d entry; the man pages; the group firewalld admits. DESTDIR
# stages it all under another root (for packages, and for tests/packaging): the venv is
# made there and its paths rewritten to where it will run; the group goes into
# $(DESTDIR)/etc/group if that file exists (else a package's postinst makes it). systemd,
# when it runs and DESTDIR is empty, is told of the units, and /run/shuttle is made.
# The venv is root's, readable by all and writable by root alone whatever root's umask:
# firewalld runs as root what is in it, and every user runs the client from it.
# systemd searches /usr/local/lib and /usr/lib; for another PREFIX, set SYSTEMDDIR and
# TMPFILESDIR to one of its directories.
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib/shuttle
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
SYSTEMDDIR ?= $(PREFIX)/lib/systemd
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
GROUP := shuttle
PROGRAMS := shuttle-client shuttle-firewalld shuttle-agent
UNITS := system/shuttle-firewalld.service user/shuttle-client@.service
# What uninstall removes, besides the venv.
INSTALLED := $(addprefix $(BINDIR)/,$(PROGRAMS)) $(addprefix $(SYSTEMDDIR)/,$(UNITS)) \
	$(TMPFILESDIR)/shuttle.conf $(MANDIR)/man1/shuttle-client.1 \
	$(MANDIR)/man8/shuttle-firewalld.8
SYSTEMD_RUNS = [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]

# Before anything is built or removed: root (but to stage into DESTDIR), and a LIBDIR that
# is shuttle's own directory, since it is removed whole.
as-root:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
		echo "make install and uninstall run as root (or stage into DESTDIR=...)"; exit 2; \
	fi
	@case "$(LIBDIR)" in /*/shuttle) ;; \
		*) echo "LIBDIR must be an absolute path ending in /shuttle, not '$(LIBDIR)'"; exit 2;; \
	esac

install: as-root dist man
	rm -rf $(DESTDIR)$(LIBDIR)
	$(PYTHON) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/pip install -q --no-input --no-compile $(DIST)/*.whl
	if [ -n "$(DESTDIR)" ]; then \
		grep -rlIZ -- "$(DESTDIR)$(LIBDIR)" $(DESTDIR)$(LIBDIR)/bin $(DESTDIR)$(LIBDIR)/pyvenv.cfg \
		| xargs -0 -r sed -i "s|$(DESTDIR)$(LIBDIR)|$(LIBDIR)|g"; \
	fi
	$(DESTDIR)$(LIBDIR)/bin/python -m compileall -q $(if $(DESTDIR),-s $(DESTDIR) -p /) \
		$(DESTDIR)$(LIBDIR)/lib
	chmod -R u=rwX,go=rX $(DESTDIR)$(LIBDIR)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMDDIR)/system $(DESTDIR)$(SYSTEMDDIR)/user \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	for p in $(PROGRAMS); do ln -sfn $(LIBDIR)/bin/$$p $(DESTDIR)$(BINDIR)/$$p || exit 1; done
	for u in $(UNITS); do \
		sed "s|/usr/local/bin/|$(BINDIR)/|" systemd/$$(basename $$u) > $(DESTDIR)$(SYSTEMDDIR)/$$u \
		&& chmod 644 $(DESTDIR)$(SYSTEMDDIR)/$$u || exit 1; \
	done
	install -m 644 systemd/shuttle.tmpfiles $(DESTDIR)$(TMPFILESDIR)/shuttle.conf
	install -m 644 $(BUILD)/man/shuttle-client.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 644 $(BUILD)/man/shuttle-firewalld.8 $(DESTDIR)$(MANDIR)/man8/
	if [ -f $(DESTDIR)/etc/group ] && ! grep -q "^$(GROUP):" $(DESTDIR)/etc/group; then \
		groupadd --system --prefix "$(or $(DESTDIR),/)" $(GROUP); \
	fi
	if $(SYSTEMD_RUNS); then \
		systemctl daemon-reload && systemd-tmpfiles --create $(TMPFILESDIR)/shuttle.conf; \
	fi
	@echo "shuttle is installed in $(LIBDIR), its programs in $(BINDIR)."
	@echo "Users who may run shuttle-client join the group: usermod -aG $(GROUP) USER"
	@echo "and start the service: systemctl enable --now shuttle-firewalld"

# `make uninstall`: stops the service, removes what install made. The group stays while
# any user is in it (as a supplementary or primary group), since files and rules in other
# places may name it; uninstall says so.
uninstall: as-root
	if $(SYSTEMD_RUNS); then systemctl disable --now shuttle-firewalld.service || true; fi
	rm -rf $(DESTDIR)$(LIBDIR)
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	if $(SYSTEMD_RUNS); then systemctl daemon-reload; fi
	if [ -f $(DESTDIR)/etc/group ] && grep -q "^$(GROUP):" $(DESTDIR)/etc/group; then \
		gid=$$(grep "^$(GROUP):" $(DESTDIR)/etc/group | cut -d: -f3); \
		members=$$(grep "^$(GROUP):" $(DESTDIR)/etc/group | cut -d: -f4); \
		if [ -n "$$members" ] || cut -d: -f4 $(DESTDIR)/etc/passwd | grep -qx "$$gid"; then \
			echo "the group $(GROUP) has members and stays: groupdel $(GROUP) removes it"; \
		else \
			groupdel --prefix "$(or $(DESTDIR),/)" $(GROUP); \
		fi; \
	fi

clean:
	rm -rf $(VENV) $(DIST) $(BUILD) .pytest_cache .mypy_cache .ruff_cache
	rm -rf $(addsuffix /build,$(PACKAGES))
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
