"""The command line: the `vpp` entry point, client commands, the demo, and the wiring."""
