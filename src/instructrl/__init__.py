"""instructrl: the InstructGPT / HH RLHF pipeline, readable and resumable."""

__version__ = "0.1.0"
