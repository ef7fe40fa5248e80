"""The event runner, by job: ``commands`` (status codes, the batch of new commands, their JSON),
``store`` (command rows in the database, stored before they are published), ``table`` (one
running event in memory) and ``loop`` (``EventRunner``: leadership, starting events, publishing
and retries, acks, the closed loop, restore and settlement)."""
