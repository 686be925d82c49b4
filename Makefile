# udev-device-plugin: the targets people expect.  `make demo` and `make test` are README's two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_EL9 := .venv-el9
VENV_EL10 := .venv-el10
VENV_ANSIBLE := .venv-ansible
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=
PYTEST_ARGS ?=
# Set to a lock file to run the tests that start udevd, boot containers or run the kubelet
# under `flock` (machines shared by several people): make test SYSTEM_LOCK=/work/.locks/system.lock
SYSTEM_LOCK ?=
LOCKED := $(if $(SYSTEM_LOCK),flock $(SYSTEM_LOCK))

# --- The three library stacks CI tests (README "Compatibility") ---------------------------------
# newest: $(PYTHON) with the newest releases of everything, plus the dev tools.
DEV_TOOLS := pytest pytest-timeout ruff mypy grpcio-tools
# EL9: RHEL 9 (+ EPEL 9) on its Python 3.9, as pinned on PyPI closest to the RPMs.
EL9_PINS := grpcio==1.46.5 protobuf==3.14.0 pyudev==0.22.0 click==8.0.3 sdnotify==0.3.2
# prometheus_client renders /metrics where installed (EPEL 9: 0.21.0, EPEL 10: 0.21.1; the RPM recommends it):
# EL10 has EPEL 10's, EL9 none, so the daemon's own writer of the same text runs on the oldest stack.
# EL10: RHEL 10 (+ EPEL 10) on its Python 3.12.  EPEL 10 has grpcio 1.48, which has no Python
# 3.12 wheel; 1.59.0 is the oldest release that has one.  No sdnotify: EL10 has no package.
EL10_PINS := grpcio==1.59.0 protobuf==3.19.6 pyudev==0.24.1 click==8.1.7 prometheus_client==0.21.1
TEST_TOOLS := pytest pytest-timeout
# Wheels only for the compiled pins: a missing wheel fails in seconds instead of building grpcio.
PIN_OPTS := --only-binary grpcio,protobuf
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON_EL9 ?= $(lastword /usr/bin/python3.9 $(sort $(wildcard $(PYENV_ROOT)/versions/3.9*/bin/python3.9)))
PYTHON_EL10 ?= $(lastword /usr/bin/python3.12 $(sort $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12)))

# --- Debian packages the tests use --------------------------------------------------------------
# `make test` installs the missing ones (Debian 12, as root); the one list.
#   make git ca-certificates: the build; python3-venv: venvs from Debian's python3
#   udev: a real systemd-udevd (tests/hotplug); umockdev gir1.2-umockdev-1.0 python3-gi: mock PCI
#     and NUMA devices (tests/hotplug drives them with Debian's python3, so no PyGObject build)
#   systemd-container debootstrap procps util-linux: a real systemd booted in a container
#   rpm rpmlint: the RPM (rpmbuild, rpmspec); golang-go dpkg-dev: building the real kubelet
#   containerd runc busybox-static iproute2: the kubelet's runtime and pod images; podman: CDI
DEB_PACKAGES := make git ca-certificates python3-venv udev umockdev gir1.2-umockdev-1.0 python3-gi \
	systemd-container debootstrap procps util-linux rpm rpmlint golang-go dpkg-dev containerd runc \
	busybox-static iproute2 podman

.PHONY: all demo venv venv-el9 venv-el10 venv-ansible deb-packages test test-unit test-newest \
	test-newest-python test-el9 test-el10 test-stacks test-system test-cdi test-kubelet lint check bench install \
	clean proto

all: check

$(VENV)/.stamp: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --upgrade -e '.[sdnotify,metrics]' $(DEV_TOOLS)
	touch $@

# $(call stack-venv,DIR,PYTHON,X.Y,NAME,PINS): a fresh venv with exactly PINS and the test tools;
# the project goes in without its dependencies, then `pip check` proves install_requires accept PINS.
define stack-venv
	@test -n "$(2)" && test -x "$(2)" || { echo "ERROR: the $(4) stack needs Python $(3), and this machine has" \
	  "none (looked for /usr/bin/python$(3) and $(PYENV_ROOT)/versions/$(3)*/bin/python$(3)): install it" \
	  "(pyenv install $(3)) or name it: make PYTHON_$(4)=/path/to/python$(3)" >&2; exit 1; }
	@$(2) -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(3)".split("."))))' || \
	  { echo "ERROR: $(2) is not Python $(3), which the $(4) stack needs" >&2; exit 1; }
	$(2) -m venv --clear $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q $(PIN_OPTS) $(5) $(TEST_TOOLS)
	$(1)/bin/pip install -q --no-deps -e .
	$(1)/bin/pip check
	touch $(1)/.stamp
endef

$(VENV_EL9)/.stamp: setup.cfg pyproject.toml Makefile
	$(call stack-venv,$(VENV_EL9),$(PYTHON_EL9),3.9,EL9,$(EL9_PINS))

$(VENV_EL10)/.stamp: setup.cfg pyproject.toml Makefile
	$(call stack-venv,$(VENV_EL10),$(PYTHON_EL10),3.12,EL10,$(EL10_PINS))

# ansible-core and ansible-lint live apart: ansible-lint pulls in many packages.
$(VENV_ANSIBLE)/.stamp: ansible/requirements.txt
	$(PYTHON) -m venv $(VENV_ANSIBLE)
	$(VENV_ANSIBLE)/bin/pip install -q -r ansible/requirements.txt
	touch $@

venv: $(VENV)/.stamp
venv-el9: $(VENV_EL9)/.stamp
venv-el10: $(VENV_EL10)/.stamp
venv-ansible: $(VENV_ANSIBLE)/.stamp

# Installs the Debian packages of DEB_PACKAGES that are missing (as root), or stops naming them.
deb-packages:
	@command -v dpkg-query >/dev/null || { echo "ERROR: the tests' system packages are installed with apt-get" \
	  "(Debian 12) and this machine has no dpkg-query; install the equivalents of: $(DEB_PACKAGES);" \
	  "then run make DEB_PACKAGES= ..." >&2; exit 1; }
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done | xargs); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "ERROR: the tests need Debian packages that are not installed: $$missing" >&2; \
	  echo "install them as root, then run make again:" >&2; \
	  echo "  sudo apt-get install -y --no-install-recommends $$missing" >&2; exit 1; fi; \
	echo "installing the Debian packages the tests use: $$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null && \
	echo "installed: $$missing"

# README's first command: serve the example devices to the tests' stand-in kubelet and show what it sees.
demo: venv
	$(VENV)/bin/python -m tests.demo

# README's second command: the Debian packages, lint, the suite on each stack (newest, also on
# protobuf's pure-Python backend; EL9; EL10), bytes across stacks, then the system tests (a real
# systemd in a container, the RPM, the Ansible role), CDI specs read by podman, and the real kubelet.
test: deb-packages lint test-newest test-newest-python test-el9 test-el10 test-stacks test-system test-cdi \
	test-kubelet

test-unit: venv
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# $(call suite,NAME,VENV,BACKEND,REPORT ARGS,HOTPLUG ARGS): versions, then tests/unit tests/e2e, then
# tests/hotplug (which starts udevd: under SYSTEM_LOCK), then how long it took.
define suite
	@$(2)/bin/python tests/stacks/report.py $(1) --backend $(3) $(4)
	@start=$$(date +%s); \
	$(2)/bin/python -m pytest tests/unit tests/e2e $(PYTEST_ARGS) && \
	$(LOCKED) $(2)/bin/python -m pytest tests/hotplug $(5) $(PYTEST_ARGS); status=$$?; \
	echo "[stack $(1)] tests/unit tests/e2e tests/hotplug: $$(( $$(date +%s) - start )) s, exit $$status"; \
	exit $$status
endef

test-newest: venv | deb-packages
	$(call suite,newest,$(VENV),upb,--present prometheus_client)

# The EL pins are pure Python already; this covers that backend on the newest protobuf.
test-newest-python: venv
	@PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python $(VENV)/bin/python tests/stacks/report.py newest-python \
	  --backend python
	PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python $(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# The 10,000-loop-device test (two minutes of udev work) runs on the newest stack only: what it proves is
# the daemon's own scale, and the device lists it pushes are encoded by hand, not by the stack's protobuf.
ONCE := --ignore=tests/hotplug/test_scale.py

test-el9: venv-el9 | deb-packages
	$(call suite,el9,$(VENV_EL9),python,$(EL9_PINS) --absent prometheus_client,$(ONCE))

test-el10: venv-el10 | deb-packages
	$(call suite,el10,$(VENV_EL10),python,$(EL10_PINS) --absent sdnotify,$(ONCE))

# Checks only the newest stack runs: descriptors.py is what `make proto` writes now, and messages
# serialized on each stack parse on the others (it calls the other venvs' pythons).
test-stacks: venv venv-el9 venv-el10
	$(VENV)/bin/python -m pytest tests/stacks $(PYTEST_ARGS)

test-system: venv venv-ansible | deb-packages
	$(LOCKED) $(VENV)/bin/python -m pytest tests/integration tests/ansible $(PYTEST_ARGS)

# The daemon's CDI specs read by a real consumer: Debian's podman runs containers with the CDI devices
# Allocate names (root; /var/run/cdi, podman's only spec directories besides /etc/cdi; real udevd).
test-cdi: venv | deb-packages
	$(LOCKED) $(VENV)/bin/python -m pytest tests/cdi $(PYTEST_ARGS)

# The daemon against a real kubelet and containerd (tests/kubelet builds the kubelet).
test-kubelet: venv | deb-packages
	@test -d tests/kubelet || { echo "ERROR: tests/kubelet does not exist: the real-kubelet tests are missing" \
	  "from this tree, so test-kubelet cannot pass" >&2; exit 1; }
	$(LOCKED) $(VENV)/bin/python -m pytest tests/kubelet $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy src

check: lint test-unit

bench: venv
	$(LOCKED) $(VENV)/bin/python -m tests.bench.run

# Regenerate what is derived from the .proto files: the serialized descriptors the runtime builds its
# message classes from (with the newest stack's grpcio-tools; its generated code is not used).
proto: venv
	$(VENV)/bin/python packaging/gen-api-descriptors.py

# Installs the package and the system files below DESTDIR (the RPM spec does the same itself).
install:
	$(PYTHON) -m pip install --no-deps --no-build-isolation --root "$(or $(DESTDIR),/)" --prefix $(PREFIX) .
	install -Dm644 etc/udev-device-plugin.conf $(DESTDIR)$(SYSCONFDIR)/udev-device-plugin/udev-device-plugin.conf
	install -dm755 $(DESTDIR)$(SYSCONFDIR)/udev-device-plugin/conf.d
	install -Dm644 etc/sysconfig/udev-device-plugin $(DESTDIR)$(SYSCONFDIR)/sysconfig/udev-device-plugin
	for unit in systemd/*.service systemd/*.path; do \
		install -Dm644 $$unit $(DESTDIR)$(PREFIX)/lib/systemd/system/$$(basename $$unit); done
	install -Dm644 man/udev-device-plugin.8 $(DESTDIR)$(PREFIX)/share/man/man8/udev-device-plugin.8
	install -Dm644 man/udev-device-plugin.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/udev-device-plugin.conf.5

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +

include packaging/rpm.mk
