"""``python -m udev_device_plugin``."""

from .entry import main

main()
