"""The customer store: models, engine and migrations."""
