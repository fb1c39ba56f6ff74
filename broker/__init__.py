"""The M2KT broker: a FastAPI service that checks and keeps signed knowledge packets."""
