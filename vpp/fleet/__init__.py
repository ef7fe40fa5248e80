"""The fleet as arrays: snapshot, registry columns, packed state records."""
