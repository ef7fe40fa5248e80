"""JSON (and CSV) shaping of what the service layers return: the routers present with these."""
