"""What the demo and the bench need and the library does not: a local S3 endpoint, tiny
Mistral-architecture backbones built in code, sample ledgers. Tests use them too."""
