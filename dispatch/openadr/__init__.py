"""The OpenADR 3.1 VTN's service side: its rules (``vtn``), the webhooks its subscriptions
are called on (``webhooks``) and the delivery reports the leader writes (``reports``)."""
