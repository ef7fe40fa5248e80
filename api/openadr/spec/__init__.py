"""The OpenADR 3.1.0 OpenAPI description, vendored with its notice (Apache-2.0, the OpenADR
Alliance): ``openadr3-3.1.0.yaml`` and ``NOTICE``."""
