"""The tag every cenfusion checkpoint carries under its ``"format"`` key.

It sits below every layer so that the models, which refuse to convert a file that is already
ours, read it without importing the engine, which writes and checks it.
"""

CHECKPOINT_FORMAT = "cenfusion-v1"
