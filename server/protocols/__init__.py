"""The serving protocols, each a codec and handlers that know nothing of their transport."""
