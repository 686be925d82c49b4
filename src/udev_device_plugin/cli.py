"""The ``udev-device-plugin`` command: parse options, call the daemon, map errors to exit codes."""

from __future__ import annotations

import os

# gRPC's core logs connection chatter at INFO on stderr; our own log says what matters.
# Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import json  # noqa: E402
import os
import sys
from typing import List, Optional

import click

from . import __version__, cdidir, config, entry, inspection
from .daemon import EXIT_CONFIG, EXIT_FAILURE, serve

DEFAULT_CONFIG = config.DEFAULT_CONFIG
assert DEFAULT_CONFIG == entry.DEFAULT_CONFIG

_config_option = click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                              help="Main config file; drop-ins are read from conf.d/ beside it.")


def _load_or_exit(path: str, dropins: Optional[List[str]] = None) -> config.Config:
    try:
        # Candidate drop-ins are judged as the daemon would judge them once in conf.d/ (permissions too).
        return config.load(path, list(dropins or ()))
    except config.ConfigError as exc:
        for message in exc.messages:
            click.echo(message, err=True)
        click.echo(f"invalid configuration: {len(exc.messages)} error(s)", err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="udev-device-plugin")
def main() -> None:
    """Advertise udev-selected host devices to the kubelet (device plugin API v1beta1)."""


@main.command("serve")
@_config_option
@click.option("--kubelet-dir", default=None, help="Overrides [plugin] kubelet_dir.")
def serve_cmd(config_path: str, kubelet_dir: Optional[str]) -> None:
    """Run the daemon in the foreground."""
    sys.exit(serve(config_path, kubelet_dir))


@main.command("check-config")
@_config_option
@click.option("--dropin", "dropins", multiple=True, metavar="FILE",
              help="Check FILE as if it were in conf.d/ (replacing a drop-in of the same name). Repeatable.")
@click.option("--kubelet-dir", default=None,
              help="As for serve, so the unit can check with the same options it serves with.")
def check_config(config_path: str, dropins: List[str], kubelet_dir: Optional[str]) -> None:
    """Validate the configuration; exit 0 when valid, 78 with every problem otherwise."""
    if kubelet_dir is not None and (not kubelet_dir.startswith("/") or os.path.normpath(kubelet_dir) != kubelet_dir):
        click.echo(f"--kubelet-dir {kubelet_dir!r}: accepted: a normalized absolute directory path", err=True)
        sys.exit(EXIT_CONFIG)
    cfg = _load_or_exit(config_path, list(dropins))
    with_cdi = [r.name for r in cfg.resources if r.cdi]
    problem = cdidir.check(cfg.plugin.cdi_spec_dir) if with_cdi else None
    if problem:
        # Known only here, not in config.parse (pure): the daemon itself logs it and serves on.
        click.echo(f"{config_path}: [plugin] cdi_spec_dir = {cfg.plugin.cdi_spec_dir!r}: {problem}; accepted: a "
                   f"directory root can write (created when missing) for the CDI specs of {', '.join(with_cdi)}",
                   err=True)
        click.echo("invalid configuration: 1 error(s)", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"configuration valid: {len(cfg.resources)} resource(s) from {len(cfg.sources)} file(s)")
    for res in cfg.resources:
        click.echo(f"  {res.name} ({res.source})")


@main.command("list")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(config_path: str, as_json: bool) -> None:
    """Show what would be advertised now: resource, ID, device nodes, NUMA, health."""
    cfg = _load_or_exit(config_path)
    rows = inspection.discover(cfg)
    if as_json:
        click.echo(json.dumps({"resources": rows}, indent=2))
        return
    for res in rows:
        click.echo(f"{res['resource']}: {len(res['devices'])} device(s)")
        for line in inspection.resource_lines(res):
            click.echo("  " + line)
        for dev in res["devices"]:
            click.echo("  " + inspection.device_line(dev))
            for line in inspection.sharing_lines(dev):
                click.echo("      " + line)
        for problem in res["problems"]:
            click.echo(f"  ! {problem}")


@main.command("inspect")
@_config_option
@click.option("--kubelet-dir", default=None, help="Where the daemon's sockets are (default: from the config).")
@click.option("--plugins-registry-dir", default=None,
              help="Where its plugin-watcher sockets are (default: from the config, when it registers that way).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for each socket to answer.")
def inspect_cmd(config_path: str, kubelet_dir: Optional[str], plugins_registry_dir: Optional[str], as_json: bool,
                timeout: float) -> None:
    """Connect to the running daemon's sockets as the kubelet would and show what it serves."""
    if kubelet_dir is None or plugins_registry_dir is None:
        plugin = _load_or_exit(config_path).plugin if kubelet_dir is None or os.path.exists(config_path) else None
        if kubelet_dir is None:
            assert plugin is not None
            kubelet_dir = plugin.kubelet_dir
        if plugins_registry_dir is None and plugin is not None and plugin.registration != "kubelet-socket":
            plugins_registry_dir = plugin.plugins_registry_dir
    report = inspection.inspect(kubelet_dir, timeout, plugins_registry_dir or "")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        inspection.print_inspect(report, click.echo)
    if not report["resources"]:
        click.echo(f"no udev-device-plugin socket answers in {kubelet_dir}", err=True)
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":  # pragma: no cover
    main()
