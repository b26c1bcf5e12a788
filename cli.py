"""What every stage's command line shares: argparse value types, one-line errors (exit code 2),
progress bars only on a terminal. Torch-free."""

import argparse
import functools
import os
import sys

from errors import UserError


def bounded_int(text, minimum, maximum=None):
    """An argparse value: an integer from `minimum` to `maximum` (if any), or a one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}: {value}")
    return value


def positive_int(text):
    return bounded_int(text, 1)


def non_negative_int(text):
    return bounded_int(text, 0)


def port_number(text):
    """A TCP port; 0 lets the system pick a free one. (waitress would quietly serve 70000 on 4464.)"""
    return bounded_int(text, 0, 65535)


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def available_cores():
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus a --help hint), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exits_on_user_error(main_function):
    """Decorate a stage's `main`: a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(main_function)
    def main(argv=None):
        try:
            return main_function(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return main


def show_progress(wanted=True):
    """Whether to draw a tqdm bar: only on a terminal (tqdm's `disable=None` rule), since a log file
    or a pipe would keep every redraw; `wanted=False` hides it anyway."""
    return wanted and sys.stderr is not None and sys.stderr.isatty()


def check_device(device):
    """auto, cpu, cuda or cuda:N; anything else is a user error (ONNX Runtime would quietly use the
    CPU). One rule for the engine and for torch (devices.choose_device)."""
    name = str(device)
    index = name.removeprefix("cuda:")
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise UserError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)")
