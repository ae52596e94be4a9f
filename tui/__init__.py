"""batuta's Textual dashboard (installed as `batuta.tui`). Built on the runtime's public API only."""
