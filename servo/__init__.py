"""Servo: settings, CLI and the embedded process that wires the other packages."""

__version__ = "0.1.0"
