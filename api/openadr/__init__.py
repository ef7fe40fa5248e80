"""The OpenADR 3.1 VTN's HTTP side: the router under ``/openadr3/3.1.0`` (``router``), OAuth2
client credentials and scopes (``auth``), the spec's problem object (``problems``) and the
vendored spec as JSON Schema (``schema``, ``spec/``)."""
