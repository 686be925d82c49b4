# udev-device-plugin: the targets people expect.  `make demo` and `make test` are README's two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_OLD := .venv-old
VENV_ANSIBLE := .venv-ansible
# The oldest stack we support (RHEL 9 era) and the newest releases; CI tests both.  The oldest
# stack runs on Python 3.9 (RHEL 9's system Python) where the machine has one.
PYTHON_OLD ?= $(firstword $(wildcard /usr/bin/python3.9 $(HOME)/.pyenv/versions/3.9*/bin/python3.9) $(PYTHON))
OLD_PINS := grpcio==1.49.1 protobuf==3.20.3 pyudev==0.22.0 click==7.1.2 sdnotify==0.3.2
DEV_TOOLS := pytest pytest-timeout ruff mypy
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=
PYTEST_ARGS ?=

.PHONY: all demo venv venv-old venv-ansible test test-unit test-new test-old test-system lint check bench install clean proto

all: check

$(VENV)/.stamp: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e . $(DEV_TOOLS)
	touch $@

$(VENV_OLD)/.stamp: setup.cfg pyproject.toml
	$(PYTHON_OLD) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/pip install -q $(OLD_PINS) pytest pytest-timeout
	$(VENV_OLD)/bin/pip install -q --no-deps -e .
	touch $@

# ansible-core and ansible-lint live apart: ansible-lint pulls in many packages.
$(VENV_ANSIBLE)/.stamp: ansible/requirements.txt
	$(PYTHON) -m venv $(VENV_ANSIBLE)
	$(VENV_ANSIBLE)/bin/pip install -q -r ansible/requirements.txt
	touch $@

venv: $(VENV)/.stamp
venv-old: $(VENV_OLD)/.stamp
venv-ansible: $(VENV_ANSIBLE)/.stamp

# README's first command: serve the example devices to a stand-in kubelet and show what it sees.
demo: venv
	$(VENV)/bin/udev-device-plugin demo

# README's second command: every test, on the newest and on the oldest supported stack,
# then the system tests (a real systemd in a container, the RPM, the Ansible role).
test: lint test-new test-old test-system

test-unit: venv
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

test-new: venv
	$(VENV)/bin/python -m pytest tests/unit tests/e2e tests/hotplug $(PYTEST_ARGS)

test-old: venv-old
	$(VENV_OLD)/bin/python --version
	$(VENV_OLD)/bin/python -m pytest tests/unit tests/e2e tests/hotplug $(PYTEST_ARGS)

test-system: venv venv-ansible
	$(VENV)/bin/python -m pytest tests/integration tests/ansible $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy src

check: lint test-unit

bench: venv
	$(VENV)/bin/python -m tests.bench.run

# Regenerate what is derived from the .proto files: the serialized descriptors the runtime
# builds its message classes from (any protoc will do; its generated code is not used).
proto:
	$(PYTHON) -m venv build/protoc
	build/protoc/bin/pip install -q grpcio-tools
	cd src/udev_device_plugin/api && ../../../build/protoc/bin/python -m grpc_tools.protoc -I. \
		--descriptor_set_out=../../../build/api.pb deviceplugin.proto status.proto
	build/protoc/bin/python packaging/gen-api-descriptors.py build/api.pb src/udev_device_plugin/api/descriptors.py

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
