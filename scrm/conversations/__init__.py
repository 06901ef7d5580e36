"""Conversations with customers on the channels where the bot is the only way in (WeChat Official
Accounts, Telegram, the console): keyword auto-replies and their fallback (:mod:`.replies`,
:mod:`.autoreply`), and the threads staff answer through the service."""
