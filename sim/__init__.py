"""The fleet simulator and synthetic-fleet generators: test, demo and bench tooling."""
