"""shuttle's proxy, run by a normal user: captures connections and carries them over ssh."""

__version__ = "0.1.0"
