"""peftlab: parameter-efficient fine-tuning research toolkit."""

__version__ = "0.1.0"
