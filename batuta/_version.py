"""The one place batuta's version is written; the wire handshake and `stack versions` read it."""

__version__ = "0.1.0"
