"""The formats of what runs leave on disk and the code that guards them (below encoding, index, serving,
evaluation and the trainers, which all read or write them)."""
