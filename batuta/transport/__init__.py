"""Transports: how the coordinator reaches its hosts (SSH, mutual TLS, local processes).

cryptography 51 deprecated DSA, and asyncssh names DSA key types at import time, so every
`import asyncssh` printed a CryptographyDeprecationWarning to stderr: two lines about
asyncssh's own source above each one-line `batuta: error: ...`, nothing a batuta user can act
on. It is silenced here, narrowly (that message, raised from asyncssh's own modules), before
any transport module imports asyncssh; every other warning still shows.
"""

import warnings

warnings.filterwarnings("ignore", message=r"DSA is deprecated", module=r"asyncssh(\.|$)")
