"""Many guests: the runner, shards and their engines, metrics, session stores, reports and the live
display. Imports the client layers, never the CLI or the simulator's internals."""
