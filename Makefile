# The one entry point for contributors and CI: `make test` works on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_TOOLS := iptables iptables-legacy iptables-nft nft ip git socat sysctl ssh-keygen gpg jq ruby ipset dnsmasq
APT_PACKAGES := iptables nftables iproute2 git socat netcat-openbsd conntrack procps libxtables-dev openssh-client gnupg jq ruby ipset dnsmasq-base

.PHONY: test lint unit sysdeps venv bench clean demo soak fuzz

test: sysdeps venv lint
	$(PY) -m pytest -q -ra

lint: venv
	$(VENV)/bin/ruff check reconciler lab tests bench
	$(VENV)/bin/ruff format --check reconciler lab tests bench
	$(VENV)/bin/mypy

# Installs the kernel-facing tools the tests drive, only when one is missing.
sysdeps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else echo "warning: missing$$missing; tests that need them will skip" >&2; fi; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml lab/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,libiptc]' -e ./lab
	touch $(STAMP)

# Every benchmark at the issues' sizes, each recording bench/results/<name>.md with the
# machine and date (root for the dataplane, agent and new-connection ones; about half an
# hour on 2 cores).  Not part of `make test`: figures, not assertions.
BENCHES := validate_bench compile_bench plan_bench dataplane_bench newconn_bench agent_fleet
bench: sysdeps venv
	set -e; for b in $(BENCHES); do echo "== $$b"; $(PY) bench/$$b.py --record; done

# The seeds' stories on this machine (root): a platform of Diego-like cells in network
# namespaces (eth0 underlay, silk-vtep overlay, CF's own chains), a real DNS server
# (dnsmasq), an agent per cell, five policy changes pushed through git (the last a grant by
# name, whose record then moves with nothing in git), a reachability matrix after each; the
# lab is always torn down.  DEMO_ARGS="--interval 5s" etc. (python -m asgctl_lab.demo -h).
DEMO_ARGS ?=
demo: sysdeps venv
	$(PY) -m asgctl_lab.demo $(DEMO_ARGS)

# The long runs (root; about half an hour on 2 cores): the fault and attack tests at the
# issue's sizes (ASGCTL_SOAK=1: 200 kills per variant, a 30 s xtables lock, 400 rounds of a
# rival editing FORWARD...), then the 10,000-cycle soak.  Figures: $(RELIABILITY_LOG) and
# bench/results/soak.json, from which bench/reliability_report.py writes the figures of
# docs/reliability.md.  `make test` runs all of it
# small.
SOAK_CYCLES ?= 10000
RELIABILITY_LOG ?= bench/results/reliability.jsonl
soak: sysdeps venv
	rm -f $(RELIABILITY_LOG)
	ASGCTL_SOAK=1 ASGCTL_RELIABILITY_LOG=$(RELIABILITY_LOG) $(PY) -m pytest -q -ra \
	  tests/test_faults.py tests/test_attacks.py tests/test_soak.py tests/test_hostile_fields.py
	$(PY) bench/soak.py --cycles $(SOAK_CYCLES) --json bench/results/soak.json
	$(PY) bench/reliability_report.py

# Coverage-guided fuzzing of load -> validate -> compile -> render and of the store parser
# with atheris, when it installs (it has wheels on PyPI), for FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 120
fuzz: venv
	$(PY) -m pip install -q atheris
	$(PY) bench/fuzz_atheris.py --target policy --seconds $(FUZZ_SECONDS)
	$(PY) bench/fuzz_atheris.py --target store --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
