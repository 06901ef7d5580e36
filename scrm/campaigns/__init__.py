"""The campaign engine: definitions from files, planning into the outbox, and sending."""
