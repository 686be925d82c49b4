"""udev-device-plugin: advertise udev-selected host devices to the kubelet."""

__version__ = "0.1.0"
