"""The distclip command, launchers, the demo, packaging, the bench."""
