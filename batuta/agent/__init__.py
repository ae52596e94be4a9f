"""The host agent: the remote side of batuta, one per host, over one framed byte stream.

The coordinator starts `python -m batuta.agent --stdio` (over SSH, or as a local subprocess)
and speaks the protocol of `batuta.protocol` on its stdin/stdout. The agent runs one worker
process per slot and feeds it tasks; it never imports numba itself (slots do, on first use).

Modules, top down:

- `main`: command line (`options`), stream hygiene, GPU slot plan; `main(argv) -> int`.
- `host`: the `Agent` on an asyncio loop: handshake, message dispatch, coalesced writes,
  heartbeats, shutdown.
- `supervisor`: one slot as the agent sees it: agent-side queue, adaptive feed depth,
  Started inference, timeouts, cancel, transactional steal-back, slot death and restarts.
  Its docstring is the reference for those rules.
- `spawn`: how a slot process starts: forked from the agent (Linux default, about 1 ms)
  or a fresh `python -m batuta.agent.slot` (`BATUTA_SLOT_SPAWN=exec`).
- `slot`: the slot worker loop; `execute` runs one kernel or binary there.
- `telemetry`: `TelemetrySource` (psutil + NVML, or `BATUTA_FAKE_GPUS=N`), package versions.
- `fdio`: non-blocking pipe reads and writes on the loop.

Nothing is imported here, so starting a slot process costs only what it uses.
"""
