"""batuta's Textual dashboard (installed as `batuta.tui`). Built on the runtime's public API only.

    model.py      the view-model: pool events folded into counters, rows and histograms (no Textual)
    rows.py       the model's row dataclasses (host, GPU, job, slot, failed task, log line)
    histogram.py  log-scale latency histograms; alerts.py the alert rules; pace.py when to draw
    logbridge.py  the `batuta` logger's records into the model; replay.py a seeded synthetic cluster
    render.py     drawing: model in, Rich Text out, styles from a Palette (no Textual)
    widgets.py    thin panels that decide when to redraw; screens.py the modal screens
    commands.py   the command palette's provider; app.py `BatutaApp`, which runs the pool
    batuta.tcss   layout and every colour, as theme variables

Start it with `batuta tui` (see `batuta.cli`), or `BatutaApp(pool).run()`.
"""
