"""Run the rest of the command line only under umockdev's preload, so no test reads the real /sys.

    umockdev-wrapper python3 preloaded.py COMMAND ARGS...

Without the preload, pyudev would silently enumerate the machine's real devices and a test could
pass or fail for reasons that have nothing to do with its mock devices.
"""

import os
import sys


def main() -> None:
    if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        sys.exit("preloaded.py: libumockdev-preload is not in LD_PRELOAD; run under umockdev-wrapper")
    testbed = os.environ.get("UMOCKDEV_DIR", "")
    if not testbed or not os.path.isdir(os.path.join(testbed, "sys")):
        sys.exit(f"preloaded.py: UMOCKDEV_DIR={testbed!r} is not a umockdev testbed")
    if len(sys.argv) < 2:
        sys.exit("usage: preloaded.py COMMAND [ARGS...]")
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
