"""``python -m udev_device_plugin``."""

from .cli import main

main()
