"""Plain-text captures of what a running app shows, for golden-file tests and quick looks.

`screen_text(app)` renders the current screen the way Textual's `export_screenshot` does
(the compositor's full update, background screens included) but records text instead of
SVG, so a snapshot diff reads like the screen itself.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console


def screen_text(app: Any) -> str:
    """The characters on `app`'s screen now, one line per row, trailing spaces removed."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        color_system=None,
        record=True,
        legacy_windows=False,
        safe_box=False,
    )
    update = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    console.print(update)
    text = console.export_text(styles=False)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
