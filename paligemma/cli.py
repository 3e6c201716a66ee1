"""The command lines' shared parser: argparse, with a mistake answered in one line instead of the whole usage."""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """Errors print `PROG: error: MESSAGE (see PROG --help)` and exit 2; subcommands inherit this."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
