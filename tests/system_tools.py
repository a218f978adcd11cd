"""The programs from tests/system-packages.txt: a test that needs one fails, naming the install command, when it is
missing (never skips)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PACKAGES_FILE = Path(__file__).with_name("system-packages.txt")
INSTALL = "sudo apt-get install -y $(sed 's/#.*//' tests/system-packages.txt)"


def system_packages() -> list[str]:
    """The package names in tests/system-packages.txt (comments after '#' are not names)."""
    lines = (line.split("#", 1)[0].strip() for line in PACKAGES_FILE.read_text().splitlines())
    return [line for line in lines if line]


def required_tool(*names: str, package: str) -> str:
    """The path of the first of `names` on the PATH; a failure that says how to install it when none is there."""
    assert package in system_packages(), f"{package} is not listed in {PACKAGES_FILE.name}"
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"this test needs {' or '.join(names)} (Debian package {package}): {INSTALL}", pytrace=False)
