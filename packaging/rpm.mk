# RPM and source tarball targets: dist, srpm, rpm, rpmlint.
# Included from the top-level Makefile ("include packaging/rpm.mk").
# Needs: git, tar, gzip, rpm (rpmbuild), rpmlint.  The %check unit tests run
# with the project venv's python (built first: pytest and the runtime modules).

RPM_NAME := udev-device-plugin
# The one source of the version.
RPM_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' src/udev_device_plugin/__init__.py)
# Bump to build an upgrade of the same version: make rpm RPM_RELEASE=2
RPM_RELEASE ?= 1
RPM_TOPDIR ?= $(CURDIR)/build/rpm
RPM_OUTDIR ?= $(CURDIR)/dist
RPM_TARBALL := $(RPM_OUTDIR)/$(RPM_NAME)-$(RPM_VERSION).tar.gz
RPM_SPEC_IN := packaging/rpm/$(RPM_NAME).spec
RPM_SPEC := $(RPM_TOPDIR)/SPECS/$(RPM_NAME).spec
RPM_FILE := $(RPM_OUTDIR)/$(RPM_NAME)-$(RPM_VERSION)-$(RPM_RELEASE).noarch.rpm
# The python that runs tests/unit in %check: Debian's python3 has neither
# pytest nor grpcio, the project venv (make venv) has everything.  RHEL builds
# of the SRPM (rpmbuild --rebuild, mock) use %{python3} and the BuildRequires.
RPM_CHECK_PYTHON ?= $(CURDIR)/$(VENV)/bin/python
RPMBUILD_OPTS ?=
# The changelog entry of the generated spec: the date of the last commit, so
# rebuilding a commit gives the same package.
RPM_PACKAGER ?= udev-device-plugin maintainers <udev-device-plugin@users.noreply.github.com>
RPM_CHANGELOG_DATE = $(shell git log -1 --format=%cd --date=format:'%a %b %d %Y' 2>/dev/null || LC_ALL=C date '+%a %b %d %Y')
RPM_GIT_DESCRIBE = $(shell git describe --always --dirty 2>/dev/null || echo unknown)
RPMBUILD := rpmbuild --define "_topdir $(RPM_TOPDIR)" \
	--define "_sourcedir $(RPM_OUTDIR)" --define "_srcrpmdir $(RPM_OUTDIR)" --define "_rpmdir $(RPM_OUTDIR)" \
	--define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
	--define "check_python $(RPM_CHECK_PYTHON)" $(RPMBUILD_OPTS)

.PHONY: dist srpm rpm rpmlint

# Source tarball: every file git tracks or would track (so uncommitted work is
# included, ignored build output is not), under $(RPM_NAME)-$(RPM_VERSION)/.
# Reproducible: sorted, fixed owner and mtime.
dist:
	@test -n "$(RPM_VERSION)" || { echo "cannot read __version__ from src/udev_device_plugin/__init__.py" >&2; exit 1; }
	mkdir -p $(RPM_OUTDIR)
	git ls-files -z --cached --others --exclude-standard \
	  | xargs -0 sh -c 'for f; do [ -e "$$f" ] && printf "%s\0" "$$f"; done' sh \
	  | tar --null -T - --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
	      --transform 's,^,$(RPM_NAME)-$(RPM_VERSION)/,' -czf $(RPM_TARBALL).tmp
	mv $(RPM_TARBALL).tmp $(RPM_TARBALL)
	@echo "wrote $(RPM_TARBALL)"

# The SRPM's spec carries the version and release, so it rebuilds anywhere.
# Rewritten every time: RPM_RELEASE and the git state are not file dates.
$(RPM_SPEC): FORCE
	mkdir -p $(dir $@)
	{ echo '%global pkg_version $(RPM_VERSION)'; echo '%global pkg_release $(RPM_RELEASE)'; \
	  cat $(RPM_SPEC_IN); \
	  echo "* $(RPM_CHANGELOG_DATE) $(RPM_PACKAGER) - $(RPM_VERSION)-$(RPM_RELEASE)"; \
	  echo "- Build of $(RPM_NAME) $(RPM_VERSION) from git $(RPM_GIT_DESCRIBE); the history is the git log"; \
	} > $@

srpm: dist $(RPM_SPEC)
	$(RPMBUILD) -bs --nodeps $(RPM_SPEC)

# --nodeps: on Debian the BuildRequires are Debian packages rpm does not know.
rpm: venv dist $(RPM_SPEC)
	$(RPMBUILD) -bb --nodeps $(RPM_SPEC)
	@echo "wrote $(RPM_FILE)"

rpmlint: rpm
	rpmlint -r packaging/rpm/$(RPM_NAME).rpmlintrc $(RPM_SPEC) $(RPM_FILE)

.PHONY: FORCE
FORCE:
