# mem-share build pipeline.
#
#   make            fetch Debian's qemu 10.0 source (and meson, seabios from
#                   bookworm-backports), overlay, patch, configure, build;
#                   the same for libvirt 11.3 (make libvirt)
#   make check      build, build the guest artifacts, run tests/run-tests
#   make guest      build the guest artifacts (kernel, initramfs, tiny guests) in build/guest
#   make demo       build everything and run scripts/demo.py
#   make fuzz       fuzz the broker protocol decoder (FUZZ_TIME=300 seconds)
#   make libvirt    fetch Debian's libvirt 11.3 source, patch, build a minimal
#                   libvirt (QEMU driver, virtqemud, virsh, the test programs
#                   make check runs) in build/libvirt-build (scripts/build-libvirt.sh)
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

.PHONY: all deps qemu engine check guest demo bench fuzz libvirt deps-libvirt clean distclean
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

# libFuzzer on the broker protocol decoder, FUZZ_TIME seconds (300): needs
# clang and the engine sources only, not QEMU.
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
