# mem-share build pipeline.
#
#   make            fetch Debian's qemu 10.0 source (and meson, seabios from
#                   bookworm-backports), overlay, patch, configure, build;
#                   the same for libvirt 11.3 (make libvirt)
#   make check      build, build the guest artifacts, run tests/run-tests
#   make guest      build the guest artifacts (kernel, initramfs, tiny guests) in build/guest
#   make demo       build everything and run scripts/demo.py
#   make fuzz       fuzz the broker: its protocol decoder, then the whole broker
#                   with several clients (FUZZ_TIME=300 seconds each)
#   make libvirt    fetch Debian's libvirt 11.3 source, patch, build a minimal
#                   libvirt (QEMU driver, virtqemud, virsh, the test programs
#                   make check runs) in build/libvirt-build (scripts/build-libvirt.sh)
#   make engine     build the QEMU-free engine, mem-share-broker and the unit
#                   tests (meson, in build/engine)
#   make install    install mem-share-broker, its manual page, its systemd units
#                   (mem-share-broker.socket and .service), the sysusers.d file
#                   of its user and the sysctl.d file raising vm.max_map_count;
#                   needs `make engine` only, not QEMU.  PREFIX (/usr/local),
#                   BINDIR, SYSCONFDIR (/etc), MANDIR, SYSTEMDUNITDIR,
#                   SYSUSERSDIR, SYSCTLDIR and DESTDIR (a staging directory;
#                   the units name the final paths) may be set.  See
#                   "Installing and running as a systemd service" in
#                   docs/system/mem-share-broker.rst
#   make uninstall  remove what make install installed (a configuration file
#                   that was changed since stays)
#   make clean      remove the QEMU, libvirt and engine build directories
#   make distclean  remove build/ entirely (the next make downloads the source again)
#
# QEMU's own dependency tracking is ninja's: the 'qemu' step always runs ninja,
# which does nothing when nothing changed.  Make tracks what ninja cannot see:
# the unpacked source, the overlay files and the patch series.
# V=1 shows the commands make runs.  B=DIR builds in DIR instead of build/
# (the scripts get it as BUILD; tests/run-tests always looks in build/).

SHELL := /bin/bash
PYTHON := /usr/bin/python3
B := build
# The scripts take their build directory from the environment.
export BUILD := $(abspath $(B))
SRC := $(B)/qemu-src
STAMPS := $(B)/stamps
GUEST := $(B)/guest

ifeq ($(V),1)
Q :=
else
Q := @
endif

# Overlay files: scripts/overlay.sh holds the list of directories (they mirror
# QEMU 10.0's tree) and the filter; this asks it.
OVERLAY_FILES := $(shell scripts/overlay.sh --list-files)
# Directories too, so that removing or adding a file is noticed.
OVERLAY_SUBDIRS := $(shell scripts/overlay.sh --list-dirs)
PATCH_FILES := $(wildcard patches/qemu/series patches/qemu/*.patch patches/qemu/*.diff)

.PHONY: all deps qemu engine check guest demo bench fuzz libvirt deps-libvirt clean distclean \
	install uninstall
.DEFAULT_GOAL := all

all: qemu engine libvirt

# Checks the Debian packages every time (quietly, a fraction of a second), so
# a machine that lost a package gets it back.  Order-only: never forces rebuilds.
deps:
	$(Q)scripts/deps.sh

# Runs again when fetch-qemu.sh changes (a new QEMU version, say): it does
# nothing, with no network, when the unpacked source and tools are current.
$(SRC)/.mem-share-version: scripts/fetch-qemu.sh | deps
	$(Q)scripts/fetch-qemu.sh
	$(Q)touch $@

$(STAMPS)/overlay: $(SRC)/.mem-share-version $(OVERLAY_FILES) $(OVERLAY_SUBDIRS) $(PATCH_FILES) \
		$(wildcard patches/qemu) scripts/overlay.sh scripts/fetch-qemu.sh | deps
	$(Q)scripts/overlay.sh
	$(Q)mkdir -p $(@D) && touch $@

qemu: $(STAMPS)/overlay | deps
	$(Q)nice -n $(or $(NICE),0) scripts/build-qemu.sh

# The QEMU-free engine library and its unit tests (top-level meson.build).
engine: | deps
ifneq ($(wildcard meson.build),)
	$(Q)if [ ! -f $(B)/engine/build.ninja ]; then \
		echo "engine: meson setup $(B)/engine"; \
		mkdir -p $(B); \
		PATH=/usr/bin:$$PATH meson setup $(B)/engine >$(B)/engine-setup.log 2>&1 \
		  || { tail -40 $(B)/engine-setup.log; rm -rf $(B)/engine; exit 1; }; \
	fi
	$(Q)PATH=/usr/bin:$$PATH meson compile -C $(B)/engine | grep -v '^INFO: \|^ninja: Entering'; exit $${PIPESTATUS[0]}
	$(Q)if [ -x $(B)/engine/tools/mem-share-broker/mem-share-broker ]; then \
		ln -sfn engine/tools/mem-share-broker/mem-share-broker $(B)/mem-share-broker; fi
endif

# Installation.  systemd reads units, sysusers.d and sysctl.d files below
# /usr/local/lib as well as the distribution's directories: with the default
# PREFIX they go there; with PREFIX=/usr, where systemd's pkg-config file
# says (Debian 12: /lib/systemd/system, /usr/lib/sysusers.d,
# /usr/lib/sysctl.d).  Another PREFIX needs links from /etc/systemd/system.
# The configuration stays in /etc whatever the PREFIX: the broker's default.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/mem-share
systemd_dir = $(or $(if $(filter /usr,$(PREFIX)),$(shell pkg-config --variable=$(1) systemd 2>/dev/null)),$(2))
SYSTEMDUNITDIR ?= $(call systemd_dir,systemdsystemunitdir,$(PREFIX)/lib/systemd/system)
SYSUSERSDIR ?= $(call systemd_dir,sysusersdir,$(PREFIX)/lib/sysusers.d)
SYSCTLDIR ?= $(call systemd_dir,sysctldir,$(PREFIX)/lib/sysctl.d)
INSTALL ?= install
RST2MAN ?= rst2man

BROKER_BIN := $(B)/engine/tools/mem-share-broker/mem-share-broker
BROKER_MAN := $(B)/man/mem-share-broker.8
BROKER_UNITS := mem-share-broker.socket mem-share-broker.service
BROKER_CONF := $(DESTDIR)$(SYSCONFDIR)/mem-share/broker.conf
# Written by the other half of the broker's configuration work; installed
# as documentation when it is there
BROKER_CONF_EXAMPLE := $(wildcard contrib/mem-share/broker.conf.example)

# rst2man's warnings are errors: a page that renders wrong is not installed
$(BROKER_MAN): docs/man/mem-share-broker.rst | deps
	$(Q)mkdir -p $(@D)
	$(Q)PATH=/usr/bin:$$PATH $(RST2MAN) --halt=warning $< $@.tmp
	$(Q)mv $@.tmp $@

install: engine $(BROKER_MAN)
	$(Q)$(INSTALL) -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(SYSCTLDIR) $(DESTDIR)$(SYSCONFDIR)/mem-share
	$(Q)$(INSTALL) -m 0755 $(BROKER_BIN) $(DESTDIR)$(BINDIR)/mem-share-broker
	$(Q)$(INSTALL) -m 0644 $(BROKER_MAN) $(DESTDIR)$(MANDIR)/man8/mem-share-broker.8
	$(Q)for u in $(BROKER_UNITS); do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
			contrib/systemd/$$u >$(B)/$$u.tmp && \
		if grep -n '@[A-Z_]*@' $(B)/$$u.tmp; then \
			echo "install: $$u: placeholder left" >&2; exit 1; fi && \
		$(INSTALL) -m 0644 $(B)/$$u.tmp $(DESTDIR)$(SYSTEMDUNITDIR)/$$u && \
		rm -f $(B)/$$u.tmp || exit 1; \
	done
	$(Q)$(INSTALL) -m 0644 contrib/sysusers.d/mem-share.conf $(DESTDIR)$(SYSUSERSDIR)/mem-share.conf
	$(Q)$(INSTALL) -m 0644 contrib/sysctl.d/60-mem-share.conf $(DESTDIR)$(SYSCTLDIR)/60-mem-share.conf
	$(Q)if [ -e $(BROKER_CONF) ]; then \
		echo "install: keeping $(BROKER_CONF)"; \
	else \
		$(INSTALL) -m 0644 contrib/mem-share/broker.conf $(BROKER_CONF); \
	fi
ifneq ($(BROKER_CONF_EXAMPLE),)
	$(Q)$(INSTALL) -d -m 0755 $(DESTDIR)$(DOCDIR)
	$(Q)$(INSTALL) -m 0644 $(BROKER_CONF_EXAMPLE) $(DESTDIR)$(DOCDIR)/broker.conf.example
endif
	$(Q)if [ -z "$(DESTDIR)" ]; then \
		echo "install: done; to run the broker: systemd-sysusers; sysctl --system;"; \
		echo "install: systemctl daemon-reload; systemctl enable --now mem-share-broker.socket"; \
	fi

# The configuration goes only if it is still the one make install put there
uninstall:
	$(Q)rm -f $(DESTDIR)$(BINDIR)/mem-share-broker \
		$(DESTDIR)$(MANDIR)/man8/mem-share-broker.8 \
		$(addprefix $(DESTDIR)$(SYSTEMDUNITDIR)/,$(BROKER_UNITS)) \
		$(DESTDIR)$(SYSUSERSDIR)/mem-share.conf \
		$(DESTDIR)$(SYSCTLDIR)/60-mem-share.conf \
		$(DESTDIR)$(DOCDIR)/broker.conf.example
	$(Q)if [ -e $(BROKER_CONF) ] && ! cmp -s contrib/mem-share/broker.conf $(BROKER_CONF); then \
		echo "uninstall: keeping $(BROKER_CONF): it was changed"; \
	else \
		rm -f $(BROKER_CONF); \
	fi
	$(Q)rmdir $(DESTDIR)$(SYSCONFDIR)/mem-share $(DESTDIR)$(DOCDIR) 2>/dev/null || true

# Guest artifacts: tests/guest/build.sh decides itself what needs rebuilding.
guest: | deps
	$(Q)if [ -x tests/guest/build.sh ]; then tests/guest/build.sh $(GUEST); \
	elif [ -f tests/guest/build.sh ]; then bash tests/guest/build.sh $(GUEST); \
	else echo "guest: tests/guest/build.sh not there yet, nothing to build"; fi

check: all guest
	$(Q)$(PYTHON) tests/run-tests

demo: all guest
	$(Q)if [ -f scripts/demo.py ]; then $(PYTHON) scripts/demo.py; \
	else echo "demo: scripts/demo.py not there yet"; exit 1; fi

bench: all
	$(Q)if [ -f scripts/bench.py ]; then $(PYTHON) scripts/bench.py; \
	else echo "bench: lands with user mode (scripts/bench.py)"; fi

# libFuzzer on the broker protocol decoder, then on the whole broker fed
# by several clients, FUZZ_TIME seconds each (300; scripts/fuzz.sh says
# more): needs clang and the engine and broker sources only, not QEMU.
fuzz: | deps
	$(Q)if [ -f scripts/fuzz.py ]; then $(PYTHON) scripts/fuzz.py; \
	elif [ -x scripts/fuzz.sh ]; then scripts/fuzz.sh; \
	else echo "fuzz: scripts/fuzz.sh is missing"; exit 1; fi

# libvirt 11.3.  deps-libvirt installs libvirt's extra packages
# as well; fetch-libvirt.sh re-unpacks (from build/dl, no network) when its
# patch series changed, and ninja does the rest.
LIBVIRT_SRC := $(B)/libvirt-src
LIBVIRT_PATCH_FILES := $(wildcard patches/libvirt/series patches/libvirt/*.patch patches/libvirt/*.diff)

deps-libvirt:
	$(Q)scripts/deps.sh libvirt

$(LIBVIRT_SRC)/.mem-share-version: scripts/fetch-libvirt.sh scripts/apt-private.sh $(LIBVIRT_PATCH_FILES) \
		$(wildcard patches/libvirt) | deps-libvirt
	$(Q)scripts/fetch-libvirt.sh
	$(Q)touch $@

libvirt: $(LIBVIRT_SRC)/.mem-share-version | deps-libvirt
	$(Q)nice -n $(or $(NICE),0) scripts/build-libvirt.sh

clean:
	rm -rf $(B)/qemu-build $(B)/engine $(B)/engine-setup.log $(STAMPS)/configure $(B)/qemu-system-x86_64 \
		$(B)/libvirt-build $(STAMPS)/libvirt-configure \
		$(B)/mem-share-broker $(B)/fuzz

distclean:
	rm -rf $(B)
