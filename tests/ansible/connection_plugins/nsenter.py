"""Ansible connection plugin: run tasks inside a booted systemd-nspawn container through nsenter.

For the role's tests (tests/ansible): ansible-playbook runs on the host and
the container is a managed node with its own Python, as a real node reached
over SSH would be.  Neither ssh nor machinectl works on these hosts (see
shared/TESTING.md), nsenter does.
"""

from __future__ import annotations

import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = r"""
name: nsenter
short_description: Run tasks inside a container through nsenter (tests only)
description:
  - The target is the container whose PID 1 has the host PID O(pid). Commands run in all of its
    namespaces with a clean, login-like environment; files are copied in and out with C(cat) run inside,
    so paths resolve against the container's own root and symlinks.
options:
  pid:
    description: Host PID of the container's PID 1.
    type: int
    required: true
    vars:
      - name: ansible_nsenter_pid
"""

# What an SSH login as root would give; nothing from the test host leaks in.
_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "USER=root", "LOGNAME=root", "LANG=C.UTF-8"]


class Connection(ConnectionBase):
    transport = "nsenter"
    has_pipelining = True

    def _argv(self, *cmd: str) -> list:
        pid = self.get_option("pid")
        return ["nsenter", "-t", str(pid), "-a", "env", "-i", *_ENV, *cmd]

    def _connect(self) -> Connection:
        if not self._connected:
            pid = self.get_option("pid")
            try:
                with open(f"/proc/{int(pid)}/comm") as f:
                    f.read()
            except (OSError, ValueError) as exc:
                raise AnsibleConnectionFailure(f"no container with PID 1 = host PID {pid!r}: {exc}") from exc
            self._connected = True
        return self

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._display.vvv(f"NSENTER EXEC {cmd}", host=self._play_context.remote_addr)
        proc = subprocess.run(self._argv("/bin/sh", "-c", cmd), input=in_data,
                              stdin=None if in_data is not None else subprocess.DEVNULL,
                              capture_output=True)
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        self._display.vvv(f"NSENTER PUT {in_path} TO {out_path}", host=self._play_context.remote_addr)
        with open(in_path, "rb") as src:
            proc = subprocess.run(self._argv("/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"), stdin=src,
                                  capture_output=True)
        if proc.returncode != 0:
            raise AnsibleError(f"failed to put {in_path} to {out_path}: {proc.stderr.decode(errors='replace')}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        self._display.vvv(f"NSENTER FETCH {in_path} TO {out_path}", host=self._play_context.remote_addr)
        with open(out_path, "wb") as dst:
            proc = subprocess.run(self._argv("cat", in_path), stdin=subprocess.DEVNULL, stdout=dst,
                                  stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise AnsibleError(f"failed to fetch {in_path} to {out_path}: {proc.stderr.decode(errors='replace')}")

    def close(self) -> None:
        self._connected = False
