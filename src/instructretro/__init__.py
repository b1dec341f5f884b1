"""InstructRetro as a reproducible DVC pipeline: retrieval database, Retro pretraining,
instruction tuning, and open-domain QA, in one package that every stage script shares."""

__version__ = "0.1.0"
