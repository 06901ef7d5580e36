"""SCRM bot service core: platform-free."""
