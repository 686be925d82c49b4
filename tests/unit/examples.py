"""The config examples the documentation shows, read from the documents themselves so that a test
of them cannot drift from what a reader copies: the man page's EXAMPLES, README's and the Ansible
role README's ``ini`` blocks, the packaged example.conf."""

from __future__ import annotations

import configparser
import os
import re
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAN_PAGE = os.path.join("man", "udev-device-plugin.conf.5")

# The roff escapes an example may use, and what a reader sees for them.
_ROFF = {"-": "-", "e": "\\", "(aq": "'", "(dq": '"', "&": "", " ": " "}


def read(relative: str) -> str:
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return f.read()


def unroff(text: str) -> str:
    """Example text from a .nf/.fi block as the reader sees it; refuses escapes it does not know."""
    def plain(match: re.Match[str]) -> str:
        if match.group(1) not in _ROFF:
            raise ValueError(f"an unknown roff escape in a man page example: {match.group(0)!r}")
        return _ROFF[match.group(1)]

    return re.sub(r"\\(\(..|.)", plain, text)


def man_examples() -> List[Tuple[str, str]]:
    """Each no-fill block of the config man page: (name, text)."""
    page = read(MAN_PAGE)
    blocks = re.findall(r"^\.nf\n(.*?)^\.fi\n", page, re.M | re.S)
    return [(f"{MAN_PAGE} example {i + 1}", unroff(b)) for i, b in enumerate(blocks)]


def markdown_ini_blocks(relative: str) -> List[Tuple[str, str]]:
    text = read(relative)
    blocks = re.findall(r"^```ini\n(.*?)^```\n", text, re.M | re.S)
    return [(f"{relative} ini block {i + 1}", b) for i, b in enumerate(blocks)]


def all_examples() -> List[Tuple[str, str]]:
    examples = man_examples() + markdown_ini_blocks("README.md")
    examples += markdown_ini_blocks(os.path.join("ansible", "roles", "udev_device_plugin", "README.md"))
    examples.append(("src/udev_device_plugin/example.conf", read(os.path.join("src", "udev_device_plugin",
                                                                                  "example.conf"))))
    return examples


def sections(text: str) -> Dict[str, Dict[str, str]]:
    """An example's sections and keys, read as the daemon reads them (no interpolation, case kept)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return {name: dict(parser.items(name)) for name in parser.sections()}


def man_section(resource: str) -> str:
    """The man page's example ``[resource NAME]`` section alone, comments included, as INI text."""
    for _, text in man_examples():
        match = re.search(rf"^(#[^\n]*\n)*\[resource {re.escape(resource)}\]\n.*?(?=^\n|^#|^\[|\Z)", text,
                          re.M | re.S)
        if match:
            return match.group(0)
    raise LookupError(f"no [resource {resource}] example in {MAN_PAGE}")
