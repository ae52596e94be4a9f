"""Protocol: sans-I/O framing and codec for the coordinator <-> host agent byte stream."""
