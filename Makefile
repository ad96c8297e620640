# The project's two commands: `make demo` and `make test`. Each installs what it needs first:
# Debian packages (apt-get, through sudo when not root) and a .venv built from Debian's
# /usr/bin/python3 -- the interpreter nbdkit's python plugin embeds -- with system site
# packages visible so Debian's python3-libnbd (the `nbd` module) imports in tests.

SHELL := /bin/bash
PYTHON_SYSTEM := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# make deb (tools/build_deb.py): dpkg-dev (dpkg-shlibdeps), binutils (strip); its test
# (tests/test_package.py) also runs systemd-analyze (systemd), man (man-db) and groff.
# libvirt: one libvirtd per simulated host (tools/libvirt_hosts.py runs them itself, in
# private mount namespaces; the packages' own services are never needed). libvirt-dev and
# pkg-config are for building libvirt-python from source in the venv.
APT_PACKAGES := python3 python3-venv python3-dev gcc openssl \
	qemu-utils qemu-system-x86 libnbd-bin python3-libnbd nbdkit nbdkit-plugin-python fio \
	busybox-static linux-image-amd64 cpio xz-utils iproute2 nftables procps \
	libvirt-daemon-system libvirt-clients libvirt-dev pkg-config util-linux mount \
	etcd-server etcd-client chromium \
	dpkg-dev binutils systemd man-db groff-base

.PHONY: deps venv test demo bench lint clean deb

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test,build]'
	touch $@

venv: deps $(VENV)/.installed

test: venv
	$(PY) -m ruff check rblock hvctl tests benchmarks tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(PY) tools/demo.py

bench: venv
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# The Debian package: build/deb/rblock_VERSION_ARCH.deb (README, "Installing on Debian").
deb: venv
	$(PY) -m tools.build_deb

lint: venv
	$(PY) -m ruff check rblock hvctl tests benchmarks tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
