"""effattn: memory-efficient attention and sequence mixing behind one API."""

__version__ = "0.1.0"
