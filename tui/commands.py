"""The command palette's batuta commands (ctrl+p): every action, searchable by name.

The list is rebuilt from the app's state each time the palette opens, so it offers
"Cancel job: demo" only while demo runs and "Drain host: gpu1" only while gpu1 is up.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from .app import PaletteCommand


class BatutaCommands(Provider):
    """Start a workload or a job file, cancel a job, pause/resume, drain a host, help."""

    def _commands(self) -> list[PaletteCommand]:
        from .app import BatutaApp  # here: app.py imports this module

        app = self.app  # Textual types it App[object]; only BatutaApp has these commands
        return app.palette_commands() if isinstance(app, BatutaApp) else []

    async def discover(self) -> Hits:
        for command in self._commands():
            yield DiscoveryHit(command.title, partial(command.run), help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(score, matcher.highlight(command.title), partial(command.run), help=command.help)
